"""Ranking pruners on units whose channels come in tied sets: a ResNeXt-style grouped block and a
YOLOv8 C2f-style chunk(2) block are pruned by magnitude, taylor and slimming in whole sets (grouped
convs keep equal groups, chunks lose as many channels each) and equal the original with the removed
channels zeroed; channel_sets pairs the weakest channel of every chunk; set-aware widths."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mslim
from mslim_core.cost import CostModel, count_cost
from mslim_core.equivalence import zero_channels
from mslim_core.errors import GraphError
from mslim_core.graph import ChannelGraph
from mslim_core.selection import (
    channel_floors,
    channel_sets,
    select_channels,
    uniform_widths,
)
from mslim_core.tracing import run_model


class TiedNet(nn.Module):
    """stem; ResNeXt-style a1 (1x1) -> a2 (3x3, groups=4) -> a3 (1x1); C2f-style c1 -> chunk(2),
    the second half through m, concat of both halves and m -> c2; classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.sb = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a1, self.ab1 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.a2, self.ab2 = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32)
        self.a3, self.ab3 = nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.c1, self.cb1 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.m, self.mb = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.cb2 = nn.Conv2d(48, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.sb(self.stem(x)))
        y = F.relu(self.ab1(self.a1(x)))
        y = F.relu(self.ab2(self.a2(y)))
        y = F.relu(self.ab3(self.a3(y)))
        y1, y2 = F.relu(self.cb1(self.c1(y))).chunk(2, 1)
        z = F.relu(self.mb(self.m(y2)))
        out = F.relu(self.cb2(self.c2(torch.cat([y1, y2, z], 1))))
        return self.fc(out.mean((2, 3)))


A1_WEAK = [3, 11, 19, 27]  # one tie class of a1 (the same in-group position of a2's 4 input groups)
A2_WEAK = [1, 9, 17, 25]  # one tie class of a2 (the same position in each of its 4 output groups)
C1_WEAK = [2, 21]  # one channel in each chunk of c1


def tied_net(seed: int = 0) -> TiedNet:
    """A TiedNet with BN away from its defaults and some clearly weak filters in the tied units."""
    torch.manual_seed(seed)
    model = TiedNet()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
        model.a1.weight[A1_WEAK] *= 0.01
        model.a2.weight[A2_WEAK] *= 0.01
        model.c1.weight[C1_WEAK] *= 0.01
        model.ab1.weight[A1_WEAK] *= 0.01
        model.ab2.weight[A2_WEAK] *= 0.01
        model.cb1.weight[C1_WEAK] *= 0.01
    return model


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def assert_equals_zeroed(original: nn.Module, small: nn.Module, removed: dict[str, list[int]]) -> None:
    """On a fresh input, the pruned model computes the original with the removed channels zeroed."""
    zeroed = zero_channels(original, ChannelGraph(original, X), removed)
    fresh = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    ref, got = run_model(zeroed, fresh), run_model(small, fresh)
    assert ref.shape == got.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6)


def assert_whole_sets(small: TiedNet, removed: dict[str, list[int]]) -> None:
    """Grouped conv keeps equal groups and removals take whole tie classes; each chunk lost as many."""
    assert small.a2.groups == 4 and small.a2.in_channels % 4 == 0 and small.a2.out_channels % 4 == 0
    for unit in ("a1", "a2"):
        ids = torch.tensor(removed.get(unit, []), dtype=torch.long)
        # a class is one in-group position in every one of the 4 groups of 8
        assert torch.bincount(ids // 8, minlength=4).unique().numel() == 1, unit
        assert torch.bincount(ids % 8, minlength=8).tolist() == [4 * int(p in (ids % 8).tolist()) for p in range(8)]
    ids = torch.tensor(removed.get("c1", []), dtype=torch.long)
    assert int((ids < 16).sum()) == int((ids >= 16).sum())
    assert small.m.in_channels * 2 == small.c1.out_channels
    assert small.c2.in_channels == small.c1.out_channels + small.m.out_channels


@pytest.mark.parametrize(
    "options", [{}, {"round_to": 4}, {"mode": "uniform"}, {"mode": "uniform", "round_to": 4}], ids=str
)
def test_magnitude_prunes_grouped_and_chunked_units(options: dict) -> None:
    model = tied_net()
    original = copy.deepcopy(model)
    small, report = mslim.prune(model, algo="magnitude", example_inputs=X, flops_target=0.6, **options)
    assert report.flops_ratio <= 0.6 + 0.01 and report.flops_ratio > 0.45
    assert report.macs_after == count_cost(small, X).macs == report.extra["predicted_macs"]
    assert report.warnings == [] and report.extra["units_considered"] == 7
    widths = report.layer_widths
    assert widths["c1"][1] < 32  # the chunked unit is pruned
    assert widths["a1"][1] < 32 or widths["a2"][1] < 32  # and the ResNeXt block
    removed = report.extra["removed_channels"]
    assert_whole_sets(small, removed)
    if options.get("mode") == "uniform":
        assert all(after < before for before, after in widths.values())
    else:  # the deliberately weak sets go first
        assert set(C1_WEAK) <= set(removed["c1"])
        for unit, weak in (("a1", A1_WEAK), ("a2", A2_WEAK)):
            if unit in removed:
                assert set(weak) <= set(removed[unit])
    if options.get("round_to"):
        assert all(after % 4 == 0 for before, after in widths.values() if after != before)
    assert report.max_output_diff is not None and report.max_output_diff < 1e-4
    assert_equals_zeroed(original, small, removed)


def test_cost_model_counts_a_layer_that_reads_one_chunk() -> None:
    model = TiedNet()
    graph = ChannelGraph(model, X)
    cost = CostModel(model, X, graph.units)  # m reads half of c1's channels
    assert cost.macs() == count_cost(model, X).macs
    c1 = [u.name for u in cost.units].index("c1")
    predicted = cost.macs_after_removing(c1, 4, cost.widths())
    graph.remove_channels("c1", [0, 1, 16, 17])
    assert predicted == count_cost(model, X).macs == cost.macs(cost.widths())


def chunk_net() -> tuple[nn.Module, ChannelGraph]:
    class ChunkNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.m, self.o = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 6, 1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.relu(self.c(x)).chunk(2, 1)
            return self.fc(self.o(torch.cat([a, b, self.m(b)], 1)).mean((2, 3)))

    model = ChunkNet()
    return model, ChannelGraph(model, torch.randn(1, 3, 6, 6))


def test_channel_sets_pair_the_weakest_of_every_chunk() -> None:
    _, graph = chunk_net()
    unit = graph.unit("c")
    assert unit.chunks == 2
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 0.5, 3.0, 9.0, 0.1])
    # chunk [0..3] ascending: 1, 3, 2, 0; chunk [4..7] ascending: 7, 4, 5, 6
    assert channel_sets(graph, unit, scores).tolist() == [[1, 7], [3, 4], [2, 5], [0, 6]]
    assert channel_sets(graph, "c").tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]  # no scores: by position
    assert channel_sets(graph, "m") is None  # a plain unit
    tied = torch.tensor([1.0, 1.0, 2.0, 1.0, 3.0, 3.0, 3.0, 3.0])  # equal scores keep the lower index first
    assert channel_sets(graph, unit, tied).tolist() == [[0, 4], [1, 5], [3, 6], [2, 7]]
    with pytest.raises(GraphError, match="has 8 channels but 3 scores"):
        channel_sets(graph, unit, torch.ones(3))
    # removing k sets removes the k weakest channels of each chunk, and the engine accepts it
    graph.remove_channels(unit, channel_sets(graph, unit, scores)[:2].flatten().sort().values)
    assert graph.removed_channels()["c"].tolist() == [1, 3, 4, 7]
    assert channel_sets(graph, unit, torch.arange(4.0)).tolist() == [[0, 2], [1, 3]]


def test_tie_classes_follow_removals() -> None:
    model = TiedNet()
    graph = ChannelGraph(model, X)
    expected = [[p + 8 * g for g in range(4)] for p in range(8)]
    assert graph.tie_classes("a1").tolist() == expected
    assert graph.tie_classes("a2").tolist() == expected
    assert channel_sets(graph, "a1", torch.rand(32)).tolist() == expected  # ties ignore scores
    assert graph.tie_classes("stem").tolist() == [[i] for i in range(16)]
    graph.remove_channels("a1", [1, 9, 17, 25])
    assert graph.tie_classes("a1").tolist() == [[p + 7 * g for g in range(4)] for p in range(7)]


class Wide(nn.Module):
    """conv(3->8) -> conv(8->24) -> conv1x1(24->16) -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 24, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(24, 16, 1, bias=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


@pytest.fixture
def wide() -> tuple[CostModel, dict[str, torch.Tensor], torch.Tensor]:
    model = Wide()
    x = torch.randn(1, 3, 8, 8)
    graph = ChannelGraph(model, x)
    cost = CostModel(model, x, graph.units)
    gen = torch.Generator().manual_seed(5)
    scores = {u.name: torch.rand(u.channels, generator=gen) + 0.1 for u in graph.units}
    sets = torch.randperm(24, generator=gen).reshape(8, 3)  # any partition into sets of 3
    return cost, scores, sets


@pytest.mark.parametrize("round_to", [1, 4])
@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.3])
def test_global_widths_move_by_whole_sets(wide, target: float, round_to: int) -> None:
    cost, scores, sets = wide
    sel = select_channels(cost, scores, target, round_to=round_to, channel_sets={"c2": sets})
    allowed = {24, 12} if round_to == 4 else set(range(3, 25, 3))  # lcm(3, 4) = 12; sets of 3
    width = sel.widths_after["c2"]
    assert width in allowed
    assert sel.macs_after == cost.macs([sel.widths_after[u.name] for u in cost.units])
    assert sel.reached and sel.flops_ratio <= target
    if round_to == 4:
        assert all(w % 4 == 0 for n, w in sel.widths_after.items() if w != sel.widths_before[n])
    k = (24 - width) // 3
    # the k sets with the lowest mean normalised score, by hand
    means = (scores["c2"] / scores["c2"].mean())[sets].mean(1)
    expected = sets[torch.sort(means, stable=True).indices[:k]].flatten().sort().values
    assert sel.removed.get("c2", torch.empty(0, dtype=torch.long)).tolist() == expected.tolist()
    assert sel.extra["set_sizes"] == {"c2": 3}


@pytest.mark.parametrize("target", [0.8, 0.5, 0.3])
def test_uniform_snaps_set_units_up(wide, target: float) -> None:
    cost, scores, sets = wide
    sel = select_channels(cost, scores, target, mode="uniform", round_to=4, channel_sets=[None, sets, None])
    original = cost.initial_widths()
    floors = channel_floors(original, original, round_to=4)
    plain = uniform_widths(sel.ratio, original, original, floors, round_to=4)
    names = [u.name for u in cost.units]
    assert names == ["c1", "c2", "c3"]
    assert sel.widths_after["c1"] == int(plain[0]) and sel.widths_after["c3"] == int(plain[2])
    assert sel.widths_after["c2"] == min(24, math.ceil(int(plain[1]) / 12) * 12)  # snapped up to lcm(3, 4)
    assert sel.reached and sel.flops_ratio <= target
    k = (24 - sel.widths_after["c2"]) // 3
    assert sel.removed.get("c2", torch.empty(0)).numel() == 3 * k


def test_units_without_sets_select_as_before(wide) -> None:
    cost, scores, _ = wide
    for mode in ("global", "uniform"):
        base = select_channels(cost, scores, 0.5, mode=mode, round_to=2)
        same = select_channels(cost, scores, 0.5, mode=mode, round_to=2, channel_sets={"c1": None})
        assert {k: v.tolist() for k, v in base.removed.items()} == {k: v.tolist() for k, v in same.removed.items()}
        assert base.widths_after == same.widths_after


def test_bad_channel_sets_are_refused(wide) -> None:
    cost, scores, sets = wide
    with pytest.raises(GraphError, match="must partition its 24 channels"):
        select_channels(cost, scores, 0.5, channel_sets={"c2": sets[:4]})
    dup = sets.clone()
    dup[0, 0] = dup[1, 0]
    with pytest.raises(GraphError, match="must partition its 24 channels"):
        select_channels(cost, scores, 0.5, channel_sets={"c2": dup})
    with pytest.raises(GraphError, match="2-D integer tensor"):
        select_channels(cost, scores, 0.5, channel_sets={"c2": sets.float()})
    with pytest.raises(GraphError, match="2-D integer tensor"):
        select_channels(cost, scores, 0.5, channel_sets={"c2": sets.flatten()})
    with pytest.raises(GraphError, match="channel_sets given for \\['nope'\\]"):
        select_channels(cost, scores, 0.5, channel_sets={"nope": sets})
    with pytest.raises(GraphError, match="one entry per unit"):
        select_channels(cost, scores, 0.5, channel_sets=[sets])


class Both(nn.Module):
    """c's output is chunked and each half feeds a grouped conv: ties and chunks on one unit."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.h = nn.Conv2d(8, 8, 1, groups=2)
        self.o = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.c(x).chunk(2, 1)
        return self.o(torch.cat([self.g(a), self.h(b)], 1))


def test_ties_and_chunks_together_are_left_out_with_a_warning() -> None:
    model = Both()
    x = torch.randn(1, 3, 8, 8)
    graph = ChannelGraph(model, x)
    unit = graph.unit("c")
    assert unit.channel_groups == 2 and unit.chunks == 2
    with pytest.raises(GraphError, match="tied by grouped convs .* chunk\\(2\\).* not supported"):
        channel_sets(graph, unit, torch.rand(16))
    small, report = mslim.prune(model, algo="magnitude", example_inputs=x, flops_target=0.8)
    assert small.c.out_channels == 16 and "c" not in report.layer_widths
    assert any(w.startswith("unit 'c' is not pruned: its channels are tied") for w in report.warnings)
    assert report.layer_widths["g"][1] < 8 and small.g.out_channels % 2 == 0


def train(session, steps: int = 4) -> None:
    opt = session.optimizer(lr=0.01)
    for _ in range(steps):
        session.model(X).pow(2).mean().backward()
        session.after_backward()
        opt.step()
        opt.zero_grad()
        session.step()


def test_taylor_prunes_tied_units() -> None:
    model = tied_net()
    session = mslim.prepare(model, algo="taylor", example_inputs=X, flops_target=0.6, pruning_steps=2, interval=2)
    train(session)  # both rounds run during training
    small, report = session.finalize()
    assert report.extra["rounds_at_finalize"] == 0
    assert report.warnings == [] and report.flops_ratio <= 0.61
    assert report.layer_widths["c1"][1] < 32
    assert report.layer_widths["a1"][1] < 32 or report.layer_widths["a2"][1] < 32
    assert_whole_sets(small, report.extra["removed_channels"])
    assert report.max_output_diff is not None and report.max_output_diff < 1e-4


def test_slimming_penalises_and_prunes_tied_units() -> None:
    model = tied_net()
    session = mslim.prepare(model, algo="slimming", example_inputs=X, flops_target=0.6, sparsity=1e-3)
    assert {"ab1", "ab2", "cb1"} <= set(session.pruner.norm_names)
    train(session, steps=2)
    trained = copy.deepcopy(session.model)
    small, report = session.finalize()
    assert report.warnings == [] and report.flops_ratio <= 0.61
    removed = report.extra["removed_channels"]
    assert set(C1_WEAK) <= set(removed["c1"])  # the smallest |gamma| pair goes first
    assert_whole_sets(small, removed)
    assert_equals_zeroed(trained, small, removed)
