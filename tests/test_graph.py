"""ChannelGraph: units found on hand-made and zoo models, physical removal checked against the
original model with the same channels zeroed, errors for unsafe requests and unsupported ops."""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mslim_core.equivalence import check_equivalence, zero_channels
from mslim_core.errors import EquivalenceError, GraphError, UnsupportedOpWarning
from mslim_core.graph import ChannelGraph
from mslim_core.removal import Removal, removals_from_json, removals_to_json

# ----------------------------------------------------------------------------- helpers


def randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics so that zeroing the wrong parameter would show."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)


def random_removal(graph: ChannelGraph, unit, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Random channels of `unit` (about `frac` of them) that respect chunk and grouped-conv rules."""
    blocks = graph.channel_blocks(unit)
    per = int(min(len(b) for b in blocks) * frac)
    if per == 0 and min(len(b) for b in blocks) > 1:
        per = 1
    picked = torch.cat([b[torch.randperm(len(b), generator=gen)[:per]] for b in blocks])
    if unit.channel_groups > 1 and picked.numel():
        picked = graph.tied_channels(unit, picked[:1])
    return picked


def prune_and_compare(
    model: nn.Module,
    x: torch.Tensor,
    frac: float = 0.3,
    rounds: int = 1,
    only_independent: bool = False,
    seed: int = 0,
) -> tuple[ChannelGraph, float]:
    """Remove random channels from every unit (in place) and compare with the zeroed original."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    randomize_norms(model, gen)
    original = copy.deepcopy(model)
    graph = ChannelGraph(model, x)
    for _ in range(rounds):
        units = graph.independent_units() if only_independent else graph.units
        for unit in units:
            idxs = random_removal(graph, unit, frac, gen)
            if idxs.numel() and idxs.numel() < unit.channels:
                graph.remove_channels(unit, idxs)
    reference = zero_channels(original, graph, graph.removed_channels())
    err = check_equivalence(reference, model, x, rtol=1e-4, kept=graph)
    assert err <= 1e-4
    return graph, err


def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


# ----------------------------------------------------------------------------- small models


class ResidualNet(nn.Module):
    """Stem, two residual blocks (identity shortcut), a projection block, linear after flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 10, 3, padding=1)  # no norm: weight rows and bias are zeroed
        self.c4 = nn.Conv2d(10, 16, 3, padding=1, bias=False)
        self.b4 = nn.BatchNorm2d(16)
        self.proj = nn.Conv2d(8, 16, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        y = self.b4(self.c4(F.relu(self.c3(x))))
        x = F.relu(y + self.proj_bn(self.proj(x)))
        return self.fc(torch.flatten(x, 1))


class ConcatNet(nn.Module):
    """ELAN-like: several branches concatenated (one twice), mixed by a 1x1 conv, pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 6, 1)
        self.b = conv_bn(3, 5, 1)
        self.c = conv_bn(5, 7)
        self.d = conv_bn(7, 4)
        self.mix = conv_bn(6 + 5 + 7 + 4 + 6, 9, 1)
        self.e = conv_bn(9, 6)
        self.out = conv_bn(9 + 6, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        c = self.c(b)
        d = self.d(c)
        y = self.mix(torch.cat([a, b, c, d, a], dim=1))
        y = self.out(torch.cat([y, self.e(y)], dim=1))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class ChunkNet(nn.Module):
    """CSP-like: a conv's output chunked in two; the halves go to different branches (in swapped
    order into the concat), one half through a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.split_conv = conv_bn(8, 12, 1)
        self.m1 = conv_bn(6, 6)
        self.m2 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.side = conv_bn(6, 5)
        self.join = conv_bn(6 + 5, 7, 1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1 = self.split_conv(self.stem(x)).chunk(2, dim=1)
        y1 = F.relu(y1 + self.m2(self.m1(y1)))
        y = self.join(torch.cat([y1, self.side(y0)], dim=1))
        return self.fc(y.mean((2, 3)))


class InvertedResidualNet(nn.Module):
    """MobileNetV2-like: pointwise -> depthwise -> pointwise, with and without shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.expand = conv_bn(8, 24, 1)
        self.dw = conv_bn(24, 24, 3, groups=24)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.expand2 = conv_bn(8, 16, 1)
        self.dw2 = conv_bn(16, 16, 3, groups=16)
        self.project2 = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = self.project2(self.dw2(self.expand2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class GroupedNet(nn.Module):
    """A conv feeding a grouped conv (groups=4), which is itself a producer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 16, 1)
        self.g = conv_bn(16, 8, 3, groups=4)
        self.b = conv_bn(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.g(self.a(x))).mean((2, 3)))


class MLPHead(nn.Module):
    """Conv, flatten, two linears: the hidden linear is a unit, the last is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 5 * 5, 20)
        self.fc2 = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class ShuffleNet(nn.Module):
    """A channel shuffle written with view/transpose between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8, 1)
        self.conv2 = conv_bn(8, 8, 1)
        self.conv3 = conv_bn(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.conv3(self.conv2(x)).mean((2, 3))


class PixelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.PixelShuffle(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.relu(self.conv2(self.up(F.relu(self.conv1(x))))))


class ModuleShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8, 1)
        self.shuffle = nn.ChannelShuffle(2)
        self.conv2 = conv_bn(8, 4, 1)
        self.conv3 = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.shuffle(self.conv1(x))))


def x_of(size: int = 8, channels: int = 3, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, size, size)


# ----------------------------------------------------------------------------- units


def test_residual_units_and_flags() -> None:
    g = ChannelGraph(ResidualNet(), x_of(4))
    names = {u.name: u for u in g.units}
    assert set(names) == {"stem", "c1", "c3", "c4"}
    stem = names["stem"]
    assert stem.coupled and not stem.independent
    assert stem.producers == ("stem", "c2")
    assert set(stem.norms) == {"stem_bn", "b2"}
    assert set(stem.consumers) == {"c1", "c3", "proj"}
    assert names["c1"].independent and names["c1"].norm_name == "b1" and names["c1"].consumers == ("c2",)
    assert names["c3"].independent and names["c3"].norm_name is None
    c4 = names["c4"]
    assert c4.producers == ("c4", "proj") and c4.consumers == ("fc",)
    assert c4.consumer_features == {"fc": 16}  # 4x4 features per channel after flatten
    assert "fc" in g.skipped and "output" in g.skipped["fc"]
    assert [u.name for u in g.independent_units()] == ["c1", "c3"]
    assert stem.reads_input and not names["c1"].reads_input


def test_depthwise_partners_are_part_of_the_pointwise_unit() -> None:
    g = ChannelGraph(InvertedResidualNet(), x_of())
    names = {u.name: u for u in g.units}
    assert "dw.0" not in names and "dw2.0" not in names
    exp = names["expand.0"]
    assert exp.independent and exp.depthwise == ("dw.0",) and exp.consumers == ("project.0",)
    assert set(exp.norms) == {"expand.1", "dw.1"}
    assert names["stem.0"].producers == ("stem.0", "project.0")
    assert names["expand2.0"].depthwise == ("dw2.0",)
    prune_and_compare(InvertedResidualNet(), x_of(), rounds=2)
    model = InvertedResidualNet()
    g = ChannelGraph(model, x_of())
    g.remove_channels("expand.0", [0, 5, 7])
    assert model.dw[0].in_channels == model.dw[0].out_channels == model.dw[0].groups == 21
    assert model.dw[1].num_features == 21 and model.project[0].in_channels == 21


def test_linear_after_flatten_and_hidden_linear_unit() -> None:
    g = ChannelGraph(MLPHead(), x_of(5))
    names = {u.name: u for u in g.units}
    assert set(names) == {"conv", "fc1"}
    assert names["conv"].consumer_features == {"fc1": 25}
    assert names["fc1"].independent and names["fc1"].consumers == ("fc2",)
    graph, _ = prune_and_compare(MLPHead(), x_of(5), frac=0.5)
    assert graph.model.fc1.in_features == graph.unit("conv").channels * 25


def test_concat_offsets_follow_successive_removals() -> None:
    model = ConcatNet()
    g = ChannelGraph(model, x_of())
    assert {u.name for u in g.units} == {"a.0", "b.0", "c.0", "d.0", "mix.0", "e.0", "out.0"}
    assert all(u.independent for u in g.units)
    prune_and_compare(ConcatNet(), x_of(), frac=0.25, rounds=3)


def test_concat_targeted_removals_land_on_the_right_slots() -> None:
    model = ConcatNet().eval()
    randomize_norms(model, torch.Generator().manual_seed(1))
    original = copy.deepcopy(model)
    g = ChannelGraph(model, x_of())
    g.remove_channels("b.0", [0, 4])
    g.remove_channels("a.0", [5])
    g.remove_channels("d.0", [1])
    g.remove_channels("b.0", [1])  # b's remaining channels are originals [1, 2, 3]: this is original 2
    assert model.mix[0].in_channels == 28 - 2 * 1 - 3 - 1  # a (concatenated twice), b three, d once
    removed = g.removed_channels()
    assert removed["b.0"].tolist() == [0, 2, 4] and removed["a.0"].tolist() == [5]
    check_equivalence(zero_channels(original, g, removed), model, x_of(), kept=g)


def test_chunk_halves_follow_removals_and_require_balance() -> None:
    g = ChannelGraph(ChunkNet(), x_of())
    u = g.unit("split_conv.0")
    assert u.chunks == 2 and u.independent is False  # the second half is added to m2's output
    assert set(u.producers) == {"split_conv.0", "m2.0"}
    with pytest.raises(GraphError, match=r"chunk\(2\).*same number"):
        g.remove_channels(u, [0])
    blocks = g.channel_blocks(u)
    assert [b.tolist() for b in blocks] == [list(range(6)), list(range(6, 12))]
    prune_and_compare(ChunkNet(), x_of(), frac=0.34, rounds=2)


def test_fixed_size_split_is_refused_with_the_reason() -> None:
    class SplitNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(5, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p, q = self.a(x).split([3, 5], dim=1)
            return self.c(q) + self.b(x)[:, :2].sum() * 0

    with pytest.warns(UnsupportedOpWarning):
        g = ChannelGraph(SplitNet(), x_of())
    with pytest.raises(GraphError, match=r"'a' cannot be pruned.*split.*sizes written into the model code"):
        g.remove_channels("a", [0])
    with pytest.raises(GraphError, match=r"'b' cannot be pruned.*slices channels"):
        g.unit("b")


def test_grouped_conv_ties_channels_across_groups() -> None:
    model = GroupedNet().eval()
    g = ChannelGraph(model, x_of())
    a, gr = g.unit("a.0"), g.unit("g.0")
    assert a.channel_groups == 4 and gr.channel_groups == 4  # 16 inputs / 8 outputs in 4 groups
    assert g.tied_channels(a, [1]).tolist() == [1, 5, 9, 13]
    with pytest.raises(GraphError, match="grouped conv.*tied"):
        g.remove_channels(a, [1, 5])
    g.remove_channels(a, [1, 5, 9, 13])
    assert model.a[0].out_channels == 12 and model.g[0].in_channels == 12 and model.g[0].weight.shape[1] == 3
    prune_and_compare(GroupedNet(), x_of(), frac=0.3)


def test_coupled_removal_shrinks_every_producer() -> None:
    model = ResidualNet()
    g = ChannelGraph(model, x_of(4))
    g.remove_channels("stem", torch.tensor([0, 3]))
    assert model.stem.out_channels == model.c2.out_channels == 6
    assert model.c1.in_channels == model.c3.in_channels == model.proj.in_channels == 6
    assert model.b2.num_features == model.stem_bn.num_features == 6
    assert g.unit("stem").channels == 6
    g.remove_channels("c4", [0])
    assert model.fc.in_features == 15 * 16 and model.proj.out_channels == 15


@pytest.mark.parametrize(
    "cls,size",
    [(ResidualNet, 4), (ConcatNet, 8), (ChunkNet, 8), (InvertedResidualNet, 8), (GroupedNet, 8), (MLPHead, 5)],
)
def test_random_removal_equals_zeroed_original(cls: type, size: int) -> None:
    for seed in range(2):
        prune_and_compare(cls(), x_of(size), frac=0.4, rounds=2, seed=seed)


# ----------------------------------------------------------------------------- state and modes


def test_modes_restored_and_works_under_no_grad() -> None:
    model = ResidualNet()
    model.train()
    model.b1.eval()
    before = {n: m.training for n, m in model.named_modules()}
    running = model.b1.running_mean.clone()
    with torch.no_grad():
        g = ChannelGraph(model, x_of(4, batch=5))
        g.remove_channels("c1", [2, 3])
    assert {n: m.training for n, m in model.named_modules()} == before
    assert torch.equal(model.b1.running_mean, torch.cat([running[:2], running[4:]]))
    assert model.c1.weight.requires_grad


def test_frozen_parameters_stay_frozen() -> None:
    model = ResidualNet()
    model.c1.weight.requires_grad_(False)
    g = ChannelGraph(model, x_of(4))
    g.remove_channels("c1", [0])
    assert not model.c1.weight.requires_grad and model.c2.weight.requires_grad


def test_tuple_inputs_and_dict_outputs() -> None:
    class TwoIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(2, 6, 3, padding=1)
            self.c = nn.Conv2d(6, 4, 1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
            z = F.relu(self.c(F.relu(self.a(x) + self.b(y))))
            return {"feat": z.mean((2, 3)).sum(1, keepdim=True), "out": self.head(z)}

    model = TwoIn().eval()
    original = copy.deepcopy(model)
    xs = (torch.randn(3, 3, 6, 6), torch.randn(3, 2, 6, 6))
    g = ChannelGraph(model, xs)
    assert {u.name for u in g.units} == {"a"} and g.unit("a").producers == ("a", "b")
    assert "c" in g.skipped  # its channels reach an output through a channel reduction
    g.remove_channels("a", [1, 4])
    assert check_equivalence(zero_channels(original, g, g.removed_channels()), model, xs) <= 1e-4


# ----------------------------------------------------------------------------- errors


def test_index_errors_name_the_problem() -> None:
    model = ResidualNet()
    g = ChannelGraph(model, x_of(4))
    with pytest.raises(GraphError, match=r"out of range.*12 channels"):
        g.remove_channels("c1", [12])
    with pytest.raises(GraphError, match=r"out of range"):
        g.remove_channels("c1", [-1])
    with pytest.raises(GraphError, match=r"duplicate channel indices \[3\]"):
        g.remove_channels("c1", [3, 3])
    with pytest.raises(GraphError, match=r"removing all 12 channels"):
        g.remove_channels("c1", list(range(12)))
    with pytest.raises(GraphError, match="integers"):
        g.remove_channels("c1", [1.0])
    with pytest.raises(GraphError, match="boolean mask"):
        g.remove_channels("c1", torch.zeros(12, dtype=torch.bool))
    with pytest.raises(GraphError, match=r"no prunable unit named 'c9'.*c1"):
        g.remove_channels("c9", [0])
    with pytest.raises(GraphError, match=r"'c2' is a coupled producer of unit 'stem'"):
        g.unit("c2")
    with pytest.raises(GraphError, match=r"'fc' cannot be pruned: its channels are model outputs"):
        g.unit("fc")
    assert model.c1.out_channels == 12 and g.history == []
    g.remove_channels("c1", list(range(11)))
    with pytest.raises(GraphError, match=r"removing all 1 channels"):
        g.remove_channels("c1", [0])


def test_ignored_layers_by_name_module_and_container() -> None:
    model = ResidualNet()
    g = ChannelGraph(model, x_of(4), ignored_layers=["c1", model.c3])
    assert {u.name for u in g.units} == {"stem", "c4"}
    assert "ignored" in g.skipped["c1"]
    g = ChannelGraph(model, x_of(4), ignored_layers=["c2"])  # a coupled producer blocks its group
    assert "stem" not in {u.name for u in g.units}
    with pytest.raises(GraphError, match="did you mean 'c1'"):
        ChannelGraph(model, x_of(4), ignored_layers=["c11"])
    with pytest.raises(GraphError, match="not part of the model"):
        ChannelGraph(model, x_of(4), ignored_layers=[nn.Conv2d(1, 1, 1)])


@pytest.mark.parametrize(
    "cls,layer,pattern",
    [
        (ShuffleNet, "conv1.0", r"'conv1.0' cannot be pruned.*(reshapes the channel dimension|transpose)"),
        (PixelShuffleNet, "conv1", r"'conv1' cannot be pruned.*'up' \(PixelShuffle"),
        (ModuleShuffleNet, "conv1.0", r"'conv1.0' cannot be pruned.*'shuffle' \(ChannelShuffle"),
    ],
)
def test_channel_moving_ops_are_refused_naming_the_layer(cls: type, layer: str, pattern: str) -> None:
    x = x_of()
    with pytest.warns(UnsupportedOpWarning, match=layer.replace(".", r"\.")):
        g = ChannelGraph(cls(), x)
    with pytest.raises(GraphError, match=pattern):
        g.remove_channels(layer, [0])
    with pytest.raises(GraphError, match=r"cannot be pruned"):
        ChannelGraph(cls(), x, strict=True)
    # layers after the op are still prunable and stay exact
    assert g.units and layer not in {u.name for u in g.units}
    with pytest.warns(UnsupportedOpWarning):
        prune_and_compare(cls(), x, frac=0.3)


def test_unrecognised_function_is_refused() -> None:
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return g * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(Double.apply(self.a(x)))

    with pytest.warns(UnsupportedOpWarning):
        g = ChannelGraph(Net(), x_of())
    with pytest.raises(GraphError, match="'a' cannot be pruned.*does not know"):
        g.unit("a")


def test_equivalence_error_names_the_first_diverging_layer() -> None:
    model = ResidualNet().eval()
    original = copy.deepcopy(model)
    g = ChannelGraph(model, x_of(4))
    g.remove_channels("c1", [0, 1])
    reference = zero_channels(original, g, g.removed_channels())
    assert check_equivalence(reference, model, x_of(4), kept=g) <= 1e-4
    with torch.no_grad():
        model.c3.weight[0, 0, 0, 0] += 1.0
    with pytest.raises(EquivalenceError, match=r"First diverging layer: 'c3' \(Conv2d\)"):
        check_equivalence(reference, model, x_of(4), kept=g)
    # without zeroing, the surviving channels of c1 already differ downstream of it
    with pytest.raises(EquivalenceError, match="does not match"):
        check_equivalence(original, model, x_of(4))


def test_zero_channels_rejects_bad_requests() -> None:
    model = ResidualNet()
    g = ChannelGraph(model, x_of(4))
    with pytest.raises(GraphError, match="no unit named 'nope'"):
        zero_channels(model, g, {"nope": [0]})
    with pytest.raises(GraphError, match="12 channels"):
        zero_channels(model, g, {"c1": [12]})


# ----------------------------------------------------------------------------- record and replay


def test_history_replays_on_a_fresh_model_and_survives_json() -> None:
    model = ConcatNet().eval()
    fresh = copy.deepcopy(model)
    g = ChannelGraph(model, x_of())
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for u in g.units:
            g.remove_channels(u, random_removal(g, u, 0.3, gen))
    assert all(isinstance(r, Removal) for r in g.history) and len(g.history) == 14
    text = json.dumps(removals_to_json(g.history))
    g2 = ChannelGraph(fresh, x_of())
    g2.replay(json.loads(text))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert check_equivalence(model, fresh, x_of()) == 0.0
    as_lists = lambda graph: {k: v.tolist() for k, v in graph.removed_channels().items()}  # noqa: E731
    assert as_lists(g2) == as_lists(g)
    with pytest.raises(GraphError, match=r"entry 0 must be \[unit name, \[indices\]\]"):
        removals_from_json([["a.0", 3]])


def test_apply_removed_in_original_indexing() -> None:
    base = ConcatNet().eval()
    model, other = copy.deepcopy(base), copy.deepcopy(base)
    g = ChannelGraph(model, x_of())
    g.remove_channels("c.0", [1, 2])
    g.remove_channels("c.0", [0])
    assert g.removed_channels()["c.0"].tolist() == [0, 1, 2]
    g2 = ChannelGraph(other, x_of())
    g2.apply_removed(g.removed_channels())
    assert check_equivalence(model, other, x_of()) == 0.0
    assert g.original_indices("c.0").tolist() == [3, 4, 5, 6]


# ----------------------------------------------------------------------------- zoo


HAS_ZOO = importlib.util.find_spec("mslim.models") is not None


@pytest.mark.skipif(not HAS_ZOO, reason="model zoo not available")
def test_resnet56_independent_units_are_block_conv1() -> None:
    import mslim.models as zoo

    g = ChannelGraph(zoo.create("resnet56"), zoo.example_input("resnet56"))
    ind = g.independent_units()
    assert len(ind) == 27
    assert all(u.name.endswith("conv1") and u.name.startswith("layer") for u in ind)
    assert all(u.norm_name is not None for u in ind)


@pytest.mark.skipif(not HAS_ZOO, reason="model zoo not available")
def test_resnet50_independent_units_are_bottleneck_conv1_conv2() -> None:
    import mslim.models as zoo

    g = ChannelGraph(zoo.create("resnet50"), torch.randn(1, 3, 32, 32))
    blocks = [u for u in g.independent_units() if not u.reads_input]
    assert len(blocks) == 32
    assert sorted({u.name.rsplit(".", 1)[0] for u in blocks}) == sorted(
        {u.name.rsplit(".", 1)[0] for u in blocks if u.name.endswith("conv1")}
    )
    assert sum(u.name.endswith(".conv1") for u in blocks) == 16 and sum(u.name.endswith(".conv2") for u in blocks) == 16
    stems = [u.name for u in g.independent_units() if u.reads_input]
    assert stems == ["conv1"]  # the stem feeds block conv1 and the projection shortcut: independent too


ZOO_SIZES = {"resnet50": 32, "yolo_elan": 64}


@pytest.mark.skipif(not HAS_ZOO, reason="model zoo not available")
@pytest.mark.parametrize(
    "name", ["resnet20", "resnet56", "resnet110", "vgg16_bn", "mobilenet_v2", "resnet50", "densenet", "yolo_elan"]
)
def test_zoo_random_removal_matches_zeroed_original(name: str) -> None:
    import mslim.models as zoo

    if name not in zoo.available():
        pytest.skip(f"{name} not in the zoo")
    torch.manual_seed(0)
    model = zoo.create(name)
    x = zoo.example_input(name)
    if name in ZOO_SIZES:
        x = torch.randn(1, 3, ZOO_SIZES[name], ZOO_SIZES[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        prune_and_compare(model, x, frac=0.3, only_independent=False)


def test_shared_scalar_prelu_follows_the_unit() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.PReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    original = copy.deepcopy(model)
    graph = ChannelGraph(model, x)
    assert [u.name for u in graph.units] == ["0"]
    graph.remove_channels("0", [1, 3])
    assert model[0].out_channels == 6 and model[2].num_parameters == 1
    reference = zero_channels(original, graph, graph.removed_channels())
    assert check_equivalence(reference, model, x) < 1e-5
