"""Importance criteria against hand computations on small layers, the group reduction included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mslim_core.errors import ConfigError, GraphError, UnknownImportanceError
from mslim_core.graph import ChannelGraph
from mslim_core.importance import (
    Importance,
    TaylorAccumulator,
    available_importances,
    filter_rows,
    get_importance,
    reduce_group,
    score_units,
)


class Residual(nn.Module):
    """stem conv+BN, a branch conv+BN added back to it (coupled), then conv, pool, linear."""

    def __init__(self, stem_bn: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(3) if stem_bn else nn.Identity()
        self.branch = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.mid = nn.Conv2d(3, 4, 1, bias=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(s + self.bn1(self.branch(s)))
        return self.fc(torch.relu(self.mid(y)).mean((2, 3)))


class CatAdd(nn.Module):
    """cat(a(x), b(x)) + c(x): units 'a' and 'b' each share producer 'c' (at offsets 0 and 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))
        return self.fc(torch.relu(self.d(y)).mean((2, 3)))


def graph_of(model: nn.Module, shape: tuple[int, ...] = (1, 2, 5, 5)) -> ChannelGraph:
    return ChannelGraph(model, torch.randn(*shape))


def set_weight(module: nn.Module, values: list) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.tensor(values, dtype=torch.float32).reshape(module.weight.shape))


def test_registry_lists_the_builtin_criteria() -> None:
    assert {"l1", "l2", "bn_scale", "taylor", "fpgm", "random"} <= set(available_importances())
    assert get_importance("taylor").needs_gradients and not get_importance("l1").needs_gradients
    with pytest.raises(UnknownImportanceError, match=r"unknown importance 'fgpm'\. Did you mean 'fpgm'\? Available: .*l1"):
        get_importance("fgpm")


def test_l1_l2_by_hand() -> None:
    model = Residual()
    g = graph_of(model)
    unit = g.unit("mid")  # independent: 4 filters of 3 weights
    w = [[1, -2, 2], [0, 0, 3], [-1, 1, 1], [4, 0, -3]]
    set_weight(model.mid, w)
    torch.testing.assert_close(get_importance("l1").scores(g, unit, model), torch.tensor([5.0, 3.0, 3.0, 7.0]))
    torch.testing.assert_close(get_importance("l2").scores(g, unit, model), torch.tensor([3.0, 3.0, 3.0**0.5, 5.0]))


def test_filter_rows_of_conv_linear_and_transposed() -> None:
    lin = nn.Linear(3, 2)
    torch.testing.assert_close(filter_rows(lin), lin.weight.detach())
    conv = nn.Conv2d(4, 6, 3, groups=2)
    assert filter_rows(conv).shape == (6, 2 * 9)
    tconv = nn.ConvTranspose2d(4, 6, 2, groups=2)  # weight (4, 3, 2, 2): in, out/groups, k, k
    rows = filter_rows(tconv)
    assert rows.shape == (6, 2 * 4)
    w = tconv.weight.detach()
    for o in range(6):
        group, j = divmod(o, 3)
        torch.testing.assert_close(rows[o], w[2 * group : 2 * group + 2, j].flatten())


def test_reduce_group_by_hand() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])  # mean 2 -> [0.5, 1, 1.5]
    b = torch.tensor([10.0, 10.0, 40.0])  # mean 20 -> [0.5, 0.5, 2]
    # mean of normalised [0.5, 0.75, 1.75] times the mean of the member means (11)
    torch.testing.assert_close(reduce_group([a, b]), torch.tensor([5.5, 8.25, 19.25]))
    torch.testing.assert_close(reduce_group([a]), a)  # one member: unchanged
    # NaN = a member does not see that channel; an all-zero member is left out
    c = torch.tensor([float("nan"), 4.0, 8.0])  # mean 6 -> [-, 2/3, 4/3]
    expected = torch.tensor([0.5, (1 + 2 / 3) / 2, (1.5 + 4 / 3) / 2]) * 4.0
    torch.testing.assert_close(reduce_group([a, c, torch.zeros(3)]), expected)
    assert reduce_group([torch.zeros(2), torch.zeros(2)]).tolist() == [0.0, 0.0]
    with pytest.raises(GraphError, match="members score different channel counts"):
        reduce_group([a, torch.ones(2)])


def test_coupled_group_uses_every_producer() -> None:
    model = Residual()
    g = graph_of(model)
    unit = g.unit("stem")
    assert unit.producers == ("stem", "branch")
    set_weight(model.stem, [[1, 1], [2, 0], [0, 3]])  # l1 [2, 2, 3]
    branch = torch.zeros(3, 3, 3, 3)
    branch[0, 0, 0, 0], branch[1, 1, 1, 1], branch[2, 2, 2, 2] = 6.0, 1.0, 2.0  # l1 [6, 1, 2]
    set_weight(model.branch, branch.tolist())
    expected = reduce_group([torch.tensor([2.0, 2.0, 3.0]), torch.tensor([6.0, 1.0, 2.0])])
    torch.testing.assert_close(get_importance("l1").scores(g, unit, model), expected)
    # by hand: [2,2,3]/(7/3) and [6,1,2]/3, averaged, times (7/3 + 3) / 2
    by_hand = (torch.tensor([6 / 7 + 2, 6 / 7 + 1 / 3, 9 / 7 + 2 / 3]) / 2) * (16 / 6)
    torch.testing.assert_close(expected, by_hand)

    with torch.no_grad():
        model.bn0.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.bn1.weight.copy_(torch.tensor([1.0, 1.0, -4.0]))
    bn = get_importance("bn_scale").scores(g, unit, model)
    torch.testing.assert_close(bn, reduce_group([torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1.0, 1.0, 4.0])]))


def test_shared_producer_slices_and_indices_after_removal() -> None:
    model = CatAdd()
    g = graph_of(model, (1, 3, 5, 5))
    l1 = get_importance("l1")
    c_rows = filter_rows(model.c).abs().sum(1)
    b_rows = filter_rows(model.b).abs().sum(1)
    torch.testing.assert_close(l1.scores(g, g.unit("b"), model), reduce_group([b_rows, c_rows[4:]]))
    g.remove_channels("a", [0, 2])  # c loses channels 0 and 2: unit b's part of c now starts at 2
    assert model.c.out_channels == 6
    torch.testing.assert_close(l1.scores(g, g.unit("b"), model), reduce_group([b_rows, c_rows[4:]]))
    a_rows = filter_rows(model.a).abs().sum(1)
    torch.testing.assert_close(l1.scores(g, g.unit("a"), model), reduce_group([a_rows, c_rows[[1, 3]]]))
    g.remove_channels("b", [1])
    keep = [0, 2, 3]
    torch.testing.assert_close(l1.scores(g, g.unit("b"), model), reduce_group([b_rows[keep], c_rows[4:][keep]]))


def test_bn_scale_needs_a_norm() -> None:
    model = Residual()
    g = graph_of(model)
    with torch.no_grad():
        model.bn0.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    crit = get_importance("bn_scale")
    assert crit.applicable(g.unit("stem"), model)
    assert not crit.applicable(g.unit("mid"), model)
    with pytest.raises(GraphError, match="no norm layer|on the channels of unit 'mid', which has none"):
        crit.scores(g, g.unit("mid"), model)


def test_fpgm_by_hand() -> None:
    model = Residual()
    g = graph_of(model)
    # filters of mid (4 filters, 3 weights): distances d01=5, d02=4, d12=3, filter 3 far away
    set_weight(model.mid, [[0, 0, 0], [3, 4, 0], [0, 4, 0], [0, 0, 12]])
    d = torch.tensor(
        [
            [0, 5, 4, 12],
            [5, 0, 3, (9 + 16 + 144) ** 0.5],
            [4, 3, 0, (16 + 144) ** 0.5],
            [12, (9 + 16 + 144) ** 0.5, (16 + 144) ** 0.5, 0],
        ]
    )
    torch.testing.assert_close(get_importance("fpgm").scores(g, g.unit("mid"), model), d.sum(1))


def test_random_is_seeded_per_unit() -> None:
    from mslim_importance import RandomImportance

    model = Residual()
    g = graph_of(model)
    crit = get_importance("random")
    first = crit.scores(g, g.unit("mid"), model)
    assert first.shape == (4,) and bool(((first >= 0) & (first < 1)).all())
    torch.testing.assert_close(crit.scores(g, g.unit("mid"), model), first)
    assert not torch.equal(RandomImportance(seed=1).scores(g, g.unit("mid"), model), first)
    assert not torch.equal(crit.scores(g, g.unit("stem"), model)[:3], first[:3])


def test_taylor_accumulates_over_batches() -> None:
    model = Residual()
    g = graph_of(model)
    unit = g.unit("stem")
    acc = TaylorAccumulator(model, [unit, g.unit("mid")])
    assert set(acc.layers) == {"stem", "branch", "mid"}
    expected = {name: torch.zeros(m.weight.shape[0]) for name, m in acc.layers.items()}
    for step in range(2):
        model.zero_grad()
        model(torch.randn(4, 2, 5, 5)).pow(2).sum().backward()
        for name, m in acc.layers.items():
            expected[name] += (m.weight * m.weight.grad).abs().flatten(1).sum(1).detach()
        acc.accumulate()
    assert acc.steps == 2
    for name in acc.layers:
        torch.testing.assert_close(acc.scores(name), expected[name])
    crit = get_importance("taylor")
    torch.testing.assert_close(crit.scores(g, g.unit("mid"), model), expected["mid"])
    torch.testing.assert_close(crit.scores(g, unit, model), reduce_group([expected["stem"], expected["branch"]]))
    # resume: the state round-trips through torch.save(weights_only=True)-friendly data
    state = acc.state_dict()
    acc.reset()
    assert float(acc.scores("mid").sum()) == 0.0
    acc.load_state_dict(state)
    torch.testing.assert_close(acc.scores("mid"), expected["mid"])
    # AMP: gradients scaled by 128 give the same sums with grad_scale=128
    acc.reset()
    model.zero_grad()
    model(torch.ones(1, 2, 5, 5)).sum().mul(128.0).backward()
    acc.accumulate(grad_scale=128.0)
    torch.testing.assert_close(
        acc.scores("mid"), (model.mid.weight * model.mid.weight.grad / 128).abs().flatten(1).sum(1).detach()
    )
    acc.detach()


def test_taylor_without_gradients_explains_what_to_do() -> None:
    model = Residual()
    g = graph_of(model)
    with pytest.raises(ConfigError, match="importance 'taylor' needs gradients, but layer 'mid'"):
        get_importance("taylor").scores(g, g.unit("mid"), model)
    model(torch.randn(2, 2, 5, 5)).sum().backward()  # one backward: this step's |w * grad| is used
    grad_scores = (model.mid.weight * model.mid.weight.grad).abs().flatten(1).sum(1).detach()
    torch.testing.assert_close(get_importance("taylor").scores(g, g.unit("mid"), model), grad_scores)


def test_custom_criterion_and_score_checks() -> None:
    class Reverse(Importance):
        name = "reverse"

        def layer_scores(self, module: nn.Module, name: str) -> torch.Tensor:
            return -torch.arange(filter_rows(module).shape[0], dtype=torch.float32) + 100

    class Broken(Importance):
        name = "broken"

        def scores(self, graph, unit, model):  # type: ignore[no-untyped-def]
            return torch.ones(unit.channels + 1)

    model = Residual()
    g = graph_of(model)
    got = score_units(Reverse(), g, model, g.units)
    torch.testing.assert_close(got["mid"], torch.tensor([100.0, 99.0, 98.0, 97.0]))
    with pytest.raises(GraphError, match="importance 'broken' returned 4 scores for unit 'stem', which has 3 channels"):
        score_units(Broken(), g, model, g.units)
    with pytest.raises(NotImplementedError, match="implements neither layer_scores"):
        Importance().scores(g, g.unit("mid"), model)
