"""Channel selection to a FLOPs target: global order against a brute-force reference, uniform
ratios, round_to, per-layer limits, unreachable targets and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mslim_core.cost import CostModel
from mslim_core.errors import ConfigError, GraphError
from mslim_core.graph import ChannelGraph
from mslim_core.selection import channel_floors, normalize_scores, select_channels, uniform_widths


class Chain(nn.Module):
    """conv(3->8) -> conv(8->12) -> conv1x1(12->16) -> mean -> linear: three independent units."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 16, 1, bias=False)
        self.b3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def chain() -> tuple[nn.Module, torch.Tensor, ChannelGraph, CostModel, dict[str, torch.Tensor]]:
    model = Chain()
    x = torch.randn(1, 3, 8, 8)
    graph = ChannelGraph(model, x)
    cost = CostModel(model, x, graph.units)
    gen = torch.Generator().manual_seed(3)
    scores = {u.name: torch.rand(u.channels, generator=gen) * (i + 1) for i, u in enumerate(graph.units)}
    return model, x, graph, cost, scores


def brute_force_global(cost: CostModel, scores: dict[str, torch.Tensor], target: float) -> dict[str, list[int]]:
    """Sort every channel by mean-normalised score; remove a prefix, recounting MACs from scratch each time."""
    names = [u.name for u in cost.units]
    items = []
    for ui, name in enumerate(names):
        s = scores[name] / scores[name].mean()
        items += [(float(s[c]), ui, c) for c in range(s.numel())]
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    widths = cost.widths().tolist()
    reference = cost.macs(widths)
    removed: dict[str, list[int]] = {}
    for _, ui, c in items:
        if cost.macs(widths) <= target * reference:
            break
        if widths[ui] <= 1:
            continue
        widths[ui] -= 1
        removed.setdefault(names[ui], []).append(c)
    return {k: sorted(v) for k, v in removed.items()}


@pytest.mark.parametrize("target", [0.9, 0.6, 0.35, 0.2])
def test_global_matches_brute_force(chain, target: float) -> None:
    _, _, _, cost, scores = chain
    sel = select_channels(cost, scores, target, mode="global")
    assert {k: v.tolist() for k, v in sel.removed.items()} == brute_force_global(cost, scores, target)
    widths = [sel.widths_after[u.name] for u in cost.units]
    assert sel.macs_after == cost.macs(widths)
    assert sel.reached and sel.flops_ratio <= target
    assert sel.macs_before == cost.macs() and sel.reference_macs == cost.macs()


def test_normalisation_choices() -> None:
    s = torch.tensor([1.0, 2.0, 5.0])
    torch.testing.assert_close(normalize_scores(s, "mean"), torch.tensor([0.375, 0.75, 1.875], dtype=torch.float64))
    torch.testing.assert_close(normalize_scores(s, "sum"), torch.tensor([0.125, 0.25, 0.625], dtype=torch.float64))
    torch.testing.assert_close(normalize_scores(s, "max"), torch.tensor([0.2, 0.4, 1.0], dtype=torch.float64))
    torch.testing.assert_close(normalize_scores(s, "none"), s.double())
    assert normalize_scores(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # all-zero scores tie, no NaN
    with pytest.raises(ConfigError, match="score normalisation 'median' is unknown; allowed: mean, sum, max, none"):
        normalize_scores(s, "median")  # type: ignore[arg-type]


def test_raw_ranking_prunes_the_small_scale_unit_first(chain) -> None:
    _, _, graph, cost, _ = chain
    scores = {"c1": torch.full((8,), 100.0), "c2": torch.arange(12.0) + 1, "c3": torch.full((16,), 100.0)}
    scores["c1"][0] = 99.0
    raw = select_channels(cost, scores, 0.8, normalize="none")
    assert set(raw.removed) == {"c2"}
    normalised = select_channels(cost, scores, 0.8, normalize="mean")  # c1[0] is 0.99 of its mean, c2[0] ~0.15
    assert "c2" in normalised.removed and normalised.removed["c2"][0] == 0


def test_uniform_bisection_finds_the_smallest_common_ratio(chain) -> None:
    _, _, _, cost, scores = chain
    sel = select_channels(cost, scores, 0.5, mode="uniform")
    original = cost.initial_widths()
    floors = channel_floors(original, original)
    assert sel.ratio is not None and sel.reached
    expected = uniform_widths(sel.ratio, original, original, floors)
    assert [sel.widths_after[u.name] for u in cost.units] == expected.tolist()
    # a slightly smaller ratio keeps more channels and misses the target
    looser = uniform_widths(sel.ratio - 1e-6, original, original, floors)
    assert cost.macs(looser) > 0.5 * cost.macs(original)
    # each unit loses its lowest-scored channels
    for name, idx in sel.removed.items():
        k = idx.numel()
        assert sorted(idx.tolist()) == sorted(torch.argsort(scores[name])[:k].tolist())


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_round_to_and_limits(chain, mode: str) -> None:
    _, _, _, cost, scores = chain
    sel = select_channels(cost, scores, 0.3, mode=mode, round_to=4)
    for name, w in sel.widths_after.items():
        assert w % 4 == 0 or w == sel.widths_before[name]
    limited = select_channels(cost, scores, 0.3, mode=mode, max_ratio_per_layer=0.25)
    for name, w in limited.widths_after.items():
        assert w >= math.ceil(0.75 * limited.widths_before[name])
    assert not limited.reached
    assert limited.reason is not None and "not reachable" in limited.reason
    assert "max_ratio_per_layer=0.25" in limited.reason
    # the best reachable plan: every unit at its limit
    assert limited.widths_after == {"c1": 6, "c2": 9, "c3": 12}


def test_channel_floors_by_hand() -> None:
    original = torch.tensor([16, 10, 3, 64])
    current = torch.tensor([16, 10, 3, 20])
    floors = channel_floors(original, current, min_channels=2, max_ratio_per_layer=0.75, round_to=4)
    # 16 -> max(2, 4) = 4; 10 -> max(2, ceil(2.5)=3) -> 4; 3 -> 4 capped at 3; 64 -> 16 capped at 20 -> 16
    assert floors.tolist() == [4, 4, 3, 16]


def test_frozen_units_and_missing_scores(chain) -> None:
    _, _, _, cost, scores = chain
    sel = select_channels(cost, {"c2": scores["c2"]}, 0.7)
    assert set(sel.removed) <= {"c2"} and sel.widths_after["c1"] == 8 and sel.widths_after["c3"] == 16


def test_bad_arguments(chain) -> None:
    _, _, _, cost, scores = chain
    with pytest.raises(ConfigError, match="selection mode 'local' is unknown; allowed: global, uniform"):
        select_channels(cost, scores, 0.5, mode="local")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"flops_target = 1.5 is invalid; allowed: 0 < x <= 1"):
        select_channels(cost, scores, 1.5)
    with pytest.raises(ConfigError, match="round_to = 0 is invalid"):
        select_channels(cost, scores, 0.5, round_to=0)
    bad = dict(scores, c2=torch.ones(5))
    with pytest.raises(GraphError, match="unit 'c2' has 12 channels but its scores have shape"):
        select_channels(cost, bad, 0.5)
    with pytest.raises(GraphError, match="not all finite"):
        select_channels(cost, dict(scores, c1=torch.full((8,), float("nan"))), 0.5)
    with pytest.raises(GraphError, match=r"scores given for \['nope'\]"):
        select_channels(cost, {"nope": torch.ones(3)}, 0.5)


def test_second_step_uses_original_reference(chain) -> None:
    """Pruning in two steps: the second selection measures the target against the original MACs."""
    model, x, graph, cost, scores = chain
    reference = cost.macs()
    first = select_channels(cost, scores, 0.7)
    for name, idx in first.removed.items():
        graph.remove_channels(name, idx)
    cost2 = CostModel(model, x, graph.units)
    scores2 = {u.name: torch.rand(u.channels) for u in graph.units}
    original = torch.tensor([first.widths_before[u.name] for u in graph.units])
    second = select_channels(cost2, scores2, 0.4, reference_macs=reference, original_widths=original)
    assert second.reached and second.macs_after <= 0.4 * reference
    assert second.macs_before == cost2.macs()
