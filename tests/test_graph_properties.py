"""Property tests: on random small CNNs (chains, residual adds, concats, chunks, depthwise and
grouped convs, squeeze-excite gates, dense concats, linear heads), removing random channels from
every unit gives a model whose outputs equal the original's with the same channels zeroed."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mslim_core.equivalence import check_equivalence, zero_channels
from mslim_core.graph import ChannelGraph


def _cbr(cin: int, cout: int, k: int, groups: int = 1, bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RandomNet(nn.Module):
    """A network assembled from a list of block specs; forward interprets the same list."""

    def __init__(self, spec: list[tuple], head: tuple, size: int) -> None:
        super().__init__()
        self.spec = spec
        self.head_spec = head
        c = 6
        self.pool_on: list[bool] = []
        self.stem = _cbr(3, c, 3)
        self.blocks = nn.ModuleList()
        for kind, *p in spec:
            m = nn.ModuleDict()
            if kind == "conv":
                out, k, bn = p
                m["c"] = _cbr(c, out, k, bn=bn)
                c = out
            elif kind == "res":
                (mid,) = p
                m["a"] = _cbr(c, mid, 3)
                m["b"] = nn.Sequential(nn.Conv2d(mid, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
            elif kind == "cat":
                a, b, with_input = p
                m["a"] = _cbr(c, a, 1)
                m["b"] = _cbr(a, b, 3)
                c = a + b + (c if with_input else 0)
            elif kind == "chunk":
                (half,) = p
                m["pre"] = _cbr(c, 2 * half, 1)
                m["m"] = _cbr(half, half, 3)
                c = 2 * half
            elif kind == "dw":
                expand, out, residual = p
                m["e"] = _cbr(c, expand, 1)
                m["d"] = _cbr(expand, expand, 3, groups=expand)
                c = c if residual else out
                m["p"] = nn.Sequential(nn.Conv2d(expand, c, 1, bias=False), nn.BatchNorm2d(c))
            elif kind == "group":
                per_in, per_out = p
                m["pre"] = _cbr(c, 2 * per_in, 1)
                m["g"] = _cbr(2 * per_in, 2 * per_out, 3, groups=2)
                c = 2 * per_out
            elif kind == "se":
                (mid,) = p
                m["fc1"] = nn.Linear(c, mid)
                m["fc2"] = nn.Linear(mid, c)
            elif kind == "dense":
                (growth,) = p
                m["c"] = _cbr(c, growth, 3)
                c = c + growth
            elif kind == "pool":
                self.pool_on.append(size >= 2)
                size = size // 2 if size >= 2 else size
            self.blocks.append(m)
        if head[0] == "gap":
            self.fc = nn.Linear(c, 3)
        else:  # flatten, hidden linear, output linear
            self.hidden = nn.Linear(c * size * size, head[1])
            self.fc = nn.Linear(head[1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        pools = iter(self.pool_on)
        for (kind, *p), m in zip(self.spec, self.blocks):
            if kind == "conv":
                x = m["c"](x)
            elif kind == "res":
                x = F.relu(x + m["b"](m["a"](x)))
            elif kind == "cat":
                a = m["a"](x)
                parts = [a, m["b"](a)] + ([x] if p[2] else [])
                x = torch.cat(parts, dim=1)
            elif kind == "chunk":
                h0, h1 = m["pre"](x).chunk(2, dim=1)
                x = torch.cat([m["m"](h1), h0], dim=1)
            elif kind == "dw":
                y = m["p"](m["d"](m["e"](x)))
                x = x + y if p[2] else y
            elif kind == "group":
                x = m["g"](m["pre"](x))
            elif kind == "se":
                gate = torch.sigmoid(m["fc2"](F.relu(m["fc1"](x.mean((2, 3))))))
                x = x * gate.view(gate.size(0), -1, 1, 1)
            elif kind == "dense":
                x = torch.cat([x, m["c"](x)], dim=1)
            elif kind == "pool" and next(pools):
                x = F.max_pool2d(x, 2)
        if self.head_spec[0] == "gap":
            return self.fc(x.mean((2, 3)))
        return self.fc(F.relu(self.hidden(torch.flatten(x, 1))))


ch = st.integers(2, 7)
block = st.one_of(
    st.tuples(st.just("conv"), ch, st.sampled_from([1, 3]), st.booleans()),
    st.tuples(st.just("res"), ch),
    st.tuples(st.just("cat"), ch, ch, st.booleans()),
    st.tuples(st.just("chunk"), ch),
    st.tuples(st.just("dw"), st.integers(3, 9), ch, st.booleans()),
    st.tuples(st.just("group"), st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.just("se"), ch),
    st.tuples(st.just("dense"), ch),
    st.tuples(st.just("pool")),
)
head = st.one_of(st.tuples(st.just("gap")), st.tuples(st.just("flat"), st.integers(2, 6)))


def _removal(graph: ChannelGraph, unit, frac: float, gen: torch.Generator) -> torch.Tensor:
    blocks = graph.channel_blocks(unit)
    smallest = min(len(b) for b in blocks)
    per = min(smallest - 1, max(1, int(smallest * frac))) if smallest > 1 else 0
    picked = torch.cat([b[torch.randperm(len(b), generator=gen)[:per]] for b in blocks])
    if unit.channel_groups > 1 and picked.numel():
        picked = graph.tied_channels(unit, picked[:1])
    return picked


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(block, min_size=1, max_size=5),
    head_spec=head,
    frac=st.floats(0.1, 0.7),
    rounds=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_random_networks_match_their_zeroed_original(spec, head_spec, frac, rounds, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = RandomNet(spec, head_spec, size=8).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    graph = ChannelGraph(model, x)
    assert graph.units, "every random net has at least the stem's unit"
    assert "fc" in graph.skipped  # the output layer is never a unit
    removed_any = False
    for _ in range(rounds):
        for unit in graph.units:
            idxs = _removal(graph, unit, frac, gen)
            if 0 < idxs.numel() < unit.channels:
                graph.remove_channels(unit, idxs)
                removed_any = True
    for unit in graph.units:
        width = unit.module.out_channels if isinstance(unit.module, nn.Conv2d) else unit.module.out_features
        assert unit.channels == width
        assert unit.channels == graph.original_indices(unit).numel() >= 1
    reference = zero_channels(original, graph, graph.removed_channels())
    err = check_equivalence(reference, model, x, rtol=1e-4, kept=graph)
    assert err <= 1e-4
    if removed_any:
        # replaying the record on a fresh copy gives the same model
        again = copy.deepcopy(original)
        ChannelGraph(again, x).replay(graph.history)
        assert check_equivalence(model, again, x) == 0.0
