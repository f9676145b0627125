"""Cost model: hand-computed MACs, exact incremental predictions against recounts of pruned models."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from mslim_core.cost import Cost, CostModel, count_cost, layer_costs
from mslim_core.errors import GraphError


def _macs(layer: nn.Module, shape: tuple[int, ...]) -> int:
    return count_cost(layer, torch.randn(*shape)).macs


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 10, 10), 3 * 8 * 9 * 10 * 10),
        (nn.Conv2d(4, 6, 3, stride=2), (1, 4, 9, 9), 4 * 6 * 9 * 4 * 4),  # (9 - 3) / 2 + 1 = 4
        (nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(2, 0)), (1, 4, 9, 5), 4 * 6 * 3 * 6 * 5),
        (nn.Conv2d(8, 12, 3, padding=1, groups=4), (1, 8, 5, 5), 8 * 12 * 9 * 25 // 4),
        (nn.Conv2d(6, 6, 5, padding=2, groups=6), (1, 6, 7, 7), 6 * 25 * 49),  # depthwise
        (nn.Conv2d(6, 12, 3, padding=1, groups=6), (1, 6, 4, 4), 12 * 9 * 16),  # depthwise, multiplier 2
        (nn.Conv2d(2, 3, 3, padding=1, dilation=1, padding_mode="reflect"), (1, 2, 4, 4), 2 * 3 * 9 * 16),
        (nn.Conv1d(3, 5, 3), (1, 3, 10), 3 * 5 * 3 * 8),
        (nn.Conv3d(2, 4, 3, padding=1), (1, 2, 3, 4, 5), 2 * 4 * 27 * 60),
        (nn.ConvTranspose2d(4, 2, 2, stride=2), (1, 4, 3, 3), 4 * 2 * 4 * 9),  # per input position
        (nn.Linear(16, 4), (1, 16), 64),
        (nn.Linear(16, 4), (1, 7, 16), 7 * 16 * 4),  # applied at 7 positions
    ],
)
def test_layer_formulas(layer: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    assert _macs(layer, shape) == expected


def test_linear_after_flatten_batch_and_params() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 10))
    cost = count_cost(model, torch.randn(5, 3, 6, 6))  # batch 5: still counted for one sample
    assert cost.macs == 3 * 4 * 9 * 9 + 36 * 10
    assert cost.params == 3 * 4 * 9 + 2 * 4 + 36 * 10 + 10
    shapes = layer_costs(model, torch.randn(5, 3, 6, 6))
    assert set(shapes) == {"0", "4"}
    assert (shapes["0"].positions, shapes["0"].kernel, shapes["0"].params) == (9, (3, 3), 108)
    assert shapes["4"].kind == "linear" and shapes["4"].macs == 360


def test_shared_module_counts_every_call_and_mode_is_restored() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(self.conv(x)))

    model = Twice().train()
    before = model.bn.running_mean.clone()
    shapes = layer_costs(model, torch.randn(1, 2, 3, 3))
    assert shapes["conv"].calls == 2 and shapes["conv"].macs == 2 * (2 * 2 * 9)
    assert model.training and model.bn.training
    torch.testing.assert_close(model.bn.running_mean, before)  # ran in eval mode


def test_count_cost_rejects_bad_inputs() -> None:
    with pytest.raises(GraphError, match="model failed on example inputs of shape"):
        count_cost(nn.Linear(4, 2), torch.randn(1, 5))
    with pytest.raises(GraphError, match="example_inputs must be a tensor"):
        count_cost(nn.Linear(4, 2), "x")


def test_cost_ratio() -> None:
    assert Cost(50, 10).ratio(Cost(100, 40)) == (0.5, 0.25)


def test_agrees_with_torch_pruning_on_conv_and_linear() -> None:
    tp = pytest.importorskip("torch_pruning")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, groups=8, bias=False),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5, bias=False))
    x = torch.randn(1, 3, 6, 6)
    ops, params = tp.utils.count_ops_and_params(model, x)
    cost = count_cost(model, x)
    assert (cost.macs, cost.params) == (ops, params)


# -- CostModel on a hand-made net whose pruned versions are built directly ------------------------


@dataclass
class FakeUnit:
    name: str
    channels: int
    producers: tuple[str, ...]
    depthwise: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    consumer_features: dict[str, int] = field(default_factory=dict)
    norm_name: str | None = None


class Net(nn.Module):
    """A stem unit with a depthwise partner, two units concatenated, a unit read by a linear after flatten."""

    def __init__(self, a: int, b: int, c: int, d: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, a, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(a)
        self.dw = nn.Conv2d(a, a, 3, padding=1, groups=a, bias=False)
        self.conv_b = nn.Conv2d(a, b, 1, stride=2)
        self.conv_c = nn.Conv2d(a, c, 3, stride=2, padding=1, bias=False)
        self.conv_d = nn.Conv2d(b + c, d, 3, stride=2, padding=1)
        self.fc = nn.Linear(d * 2 * 2, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn_a(self.conv_a(x)))
        y = torch.cat([self.conv_b(self.dw(a)), self.conv_c(a)], 1)
        return self.fc(torch.flatten(self.conv_d(y), 1))


WIDTHS = (8, 6, 5, 4)
UNITS = [
    FakeUnit("conv_a", 8, ("conv_a",), ("dw",), ("conv_b", "conv_c"), ("bn_a",)),
    FakeUnit("conv_b", 6, ("conv_b",), consumers=("conv_d",)),
    FakeUnit("conv_c", 5, ("conv_c",), consumers=("conv_d",)),
    FakeUnit("conv_d", 4, ("conv_d",), consumers=("fc",), consumer_features={"fc": 4}),
]
X = torch.randn(2, 3, 8, 8)


def test_cost_model_is_exact_at_every_width() -> None:
    model = Net(*WIDTHS)
    cm = CostModel(model, X, UNITS)
    assert cm.macs() == count_cost(model, X).macs
    assert cm.params() == count_cost(model, X).params
    assert cm.layers_of(0) == ["conv_a", "dw", "conv_b", "conv_c"]
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        w = torch.stack([torch.randint(1, n + 1, (1,), generator=g)[0] for n in WIDTHS])
        pruned = count_cost(Net(*w.tolist()), X)
        assert cm.macs(w) == pruned.macs
        assert cm.params(w) == pruned.params
        for u in range(4):
            for k in range(int(w[u]) + 1):
                smaller = w.clone()
                smaller[u] -= k
                expected = count_cost(Net(*smaller.tolist()), X).macs if k < w[u] else None
                got = cm.macs_after_removing(u, k, w)
                if expected is not None:
                    assert got == expected
            if w[u] > 1:
                smaller = w.clone()
                smaller[u] -= 1
                assert cm.removal_delta(u, w) == pruned.macs - count_cost(Net(*smaller.tolist()), X).macs
    batch = torch.tensor([[8, 6, 5, 4], [1, 1, 1, 1], [3, 2, 5, 1]])
    assert cm.macs(batch).tolist() == [count_cost(Net(*row), X).macs for row in batch.tolist()]


def test_removal_deltas_vectorised_match_single_queries() -> None:
    cm = CostModel(Net(*WIDTHS), X, UNITS)
    w = torch.tensor([5, 3, 2, 2])
    assert cm.removal_deltas(w).tolist() == [cm.removal_delta(u, w) for u in range(4)]


def test_incremental_cache_follows_a_greedy_walk() -> None:
    cm = CostModel(Net(*WIDTHS), X, UNITS)
    w = cm.widths()
    for u in [0, 3, 3, 1, 2, 0, 0, 1]:
        predicted = cm.macs_after_removing(u, 1, w)
        w[u] -= 1  # in place, as a mask search would
        assert predicted == cm.macs(w) == count_cost(Net(*w.tolist()), X).macs
    w2 = torch.tensor([2, 2, 2, 2])  # a jump in every unit: full recount of the cache
    assert cm.macs_after_removing(1, 1, w2) == count_cost(Net(2, 1, 2, 2), X).macs


def test_cost_model_errors() -> None:
    cm = CostModel(Net(*WIDTHS), X, UNITS)
    with pytest.raises(GraphError, match="cannot remove 9 channels from unit 'conv_a' of width 8"):
        cm.macs_after_removing(0, 9, cm.widths())
    with pytest.raises(GraphError, match="one entry per unit \\(4\\)"):
        cm.macs(torch.tensor([1, 2, 3]))
    with pytest.raises(GraphError, match="fewer than its units account for"):
        CostModel(Net(*WIDTHS), X, [FakeUnit("conv_b", 60, ("conv_b",))])
    with pytest.raises(GraphError, match="lists 'conv_b' as depthwise"):
        CostModel(Net(*WIDTHS), X, [FakeUnit("conv_a", 8, ("conv_a",), depthwise=("conv_b",))])


def test_query_is_fast_on_a_small_net() -> None:
    cm = CostModel(Net(*WIDTHS), X, UNITS)
    w = cm.widths()
    cm.macs_after_removing(0, 1, w)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        cm.macs_after_removing(0, 1, w)
    per_query = (time.perf_counter() - start) / n
    assert per_query < 200e-6  # about 5 us on one free core; loose for a shared machine


# -- CostModel on zoo models, against recounts after ChannelGraph removes the channels -----------


@pytest.mark.parametrize("name", ["resnet56", "mobilenet_v2", "densenet", "yolo_elan"])
def test_predictions_match_physical_removal(name: str) -> None:
    from mslim.models import create, example_input
    from mslim_core.graph import ChannelGraph

    torch.manual_seed(0)
    model = create(name).eval()
    x = example_input(name)
    graph = ChannelGraph(model, x)
    cm = CostModel(model, x, graph.units)
    start = count_cost(model, x)
    assert (cm.macs(), cm.params()) == (start.macs, start.params)
    gen = torch.Generator().manual_seed(1)
    # a coupled unit first (residual group / concat), then random ones
    order = [next(i for i, u in enumerate(graph.units) if not u.independent)] if graph.coupled_units() else []
    order += torch.randint(len(graph.units), (5,), generator=gen).tolist()
    checked = 0
    for ui in order:
        unit = graph.units[ui]
        if unit.channels <= unit.channel_groups:
            continue
        idxs = graph.tied_channels(unit, torch.randperm(unit.channels, generator=gen)[: max(1, unit.channels // 3)])
        if idxs.numel() >= unit.channels:
            continue
        widths = cm.widths()
        predicted = cm.macs_after_removing(ui, idxs.numel(), widths)
        graph.remove_channels(unit, idxs)
        after = count_cost(model, x)
        assert predicted == after.macs == cm.macs()
        assert cm.params() == after.params
        checked += 1
    assert checked >= 3


def test_query_is_fast_on_resnet56() -> None:
    from mslim.models import create, example_input
    from mslim_core.graph import ChannelGraph

    model = create("resnet56")
    x = example_input("resnet56")
    cm = CostModel(model, x, ChannelGraph(model, x).units)
    w = cm.widths().tolist()
    n_units, n = len(w), 3000
    start = time.perf_counter()
    for i in range(n):  # a greedy walk: query, then take the channel
        u = i % n_units
        if w[u] > 1:
            cm.macs_after_removing(u, 1, w)
            w[u] -= 1
    per_query = (time.perf_counter() - start) / n
    assert per_query < 100e-6  # about 5 us on one free core; loose for a shared machine
    assert cm.macs(w) == cm.macs_after_removing(0, 0, w)
