"""ResRep mask schedule (against a brute-force walk) and the proximal zeroing of masked rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mslim
import mslim.models as zoo
from mslim_core.cost import count_cost
from mslim_core.graph import ChannelGraph
from mslim_resrep.schedule import growth_limit


@pytest.fixture(scope="module")
def resnet56():
    torch.manual_seed(0)
    model = zoo.create("resnet56")
    x = zoo.example_input("resnet56")
    original = copy.deepcopy(model)
    session = mslim.prepare(model, "resrep", example_inputs=x, ignored_layers=["fc"], zeroing="none",
                            flops_target=0.471)
    return session, original, x


def _set_norms(pruner, norms: list[torch.Tensor], clear: bool = True) -> None:
    """Compactors = diag(norms): row i has L2 norm norms[i]; masks cleared (a fresh start)."""
    if clear:
        pruner._masked_at[:] = -1
        pruner._refresh_masks()
    with torch.no_grad():
        for c, n in zip(pruner.compactors.values(), norms):
            c.weight.zero_()
            idx = torch.arange(c.out_channels)
            c.weight[idx, idx, 0, 0] = n


def _brute_force(pruner, norms: list[torch.Tensor], current: int, granularity: int) -> set[tuple[int, int]]:
    """The spec's walk, one channel at a time, with a full MACs count after each channel."""
    cost = pruner.cost
    widths = [u.channels for u in pruner.units]
    target = pruner.config.flops_target * cost.macs(torch.tensor(widths))
    rows = sorted(
        ((float(n), layer, ch) for layer, ns in enumerate(norms) for ch, n in enumerate(ns.tolist())),
    )
    masked: set[tuple[int, int]] = set()
    if cost.macs(torch.tensor(widths)) <= target:
        return masked
    for _, layer, ch in rows:
        if widths[layer] <= pruner.config.num_at_least:
            continue
        masked.add((layer, ch))
        widths[layer] -= 1
        if cost.macs(torch.tensor(widths)) <= target or len(masked) >= current + granularity:
            break
    return masked


def _masked_pairs(pruner) -> set[tuple[int, int]]:
    return {
        (layer, int(ch))
        for layer, m in enumerate(pruner.masks().values())
        for ch in torch.nonzero(m == 0).flatten()
    }


def test_schedule_matches_brute_force_and_reaches_target(resnet56) -> None:
    session, original, x = resnet56
    pruner = session.pruner
    g = torch.Generator().manual_seed(1)
    norms = [torch.rand(u.channels, generator=g) * 2 + 0.05 for u in pruner.units]
    _set_norms(pruner, norms)
    pruner.config.begin_granularity = 4
    current = 0
    for it in range(3):  # while above the target, each update adds at most 4 channels
        pruner.update_masks(1000 + it)
        got = _masked_pairs(pruner)
        assert got == _brute_force(pruner, norms, current, 4)
        assert len(got) == current + 4
        current = len(got)
    pruner.config.begin_granularity = 10_000  # now walk to the target in one update
    pruner.update_masks(2000)
    got = _masked_pairs(pruner)
    assert got == _brute_force(pruner, norms, current, 10_000)
    macs = pruner.progress()["flops_ratio"] * pruner.original_macs
    assert macs <= 0.471 * pruner.original_macs
    # minimal: unmasking the last channel of the walk (the largest masked norm) is above the target
    largest = max(got, key=lambda lc: float(norms[lc[0]][lc[1]]))
    widths = torch.tensor([u.channels for u in pruner.units])
    for layer, _ in got - {largest}:
        widths[layer] -= 1
    assert pruner.cost.macs(widths) > 0.471 * pruner.original_macs
    # the cost model's count equals a real count of the physically pruned original
    pruned = copy.deepcopy(original)
    graph = ChannelGraph(pruned, x, ignored_layers=["fc"])
    for layer, unit in enumerate(pruner.units):
        ids = sorted(ch for lay, ch in got if lay == layer)
        if ids:
            graph.remove_channels(unit.name, ids)
    assert count_cost(pruned, x).macs == round(macs)


def test_selected_ids_are_real_channel_ids(resnet56) -> None:
    session, _, _ = resnet56
    pruner = session.pruner
    norms = [torch.full((u.channels,), 1.0) for u in pruner.units]
    layer = [u.name for u in pruner.units].index("layer2.4.conv1")
    norms[layer][torch.tensor([3, 17, 30])] = torch.tensor([0.02, 0.01, 0.03])
    _set_norms(pruner, norms)
    pruner.config.begin_granularity = 3
    pruner.update_masks(5000)
    mask = pruner.masks()["layer2.4.conv1"]
    assert torch.nonzero(mask == 0).flatten().tolist() == [3, 17, 30]
    assert pruner.masked_rows() == 3


def test_num_at_least_keeps_layers_alive(resnet56) -> None:
    session, _, _ = resnet56
    pruner = session.pruner
    norms = [torch.full((u.channels,), 1.0) + torch.arange(u.channels) * 1e-3 for u in pruner.units]
    norms[0] = torch.full((16,), 1e-4)  # the whole first layer would go first
    _set_norms(pruner, norms)
    pruner.config.begin_granularity = 40
    pruner.config.num_at_least = 2
    try:
        pruner.update_masks(6000)
    finally:
        pruner.config.num_at_least = 1
    mask = pruner.masks()["layer1.0.conv1"]
    assert int(mask.sum()) == 2 and pruner.masked_rows() == 40


def test_paper_mode_rebuilds_masks_from_scratch(resnet56) -> None:
    session, _, _ = resnet56
    pruner = session.pruner
    norms = [torch.full((u.channels,), 1.0) + torch.arange(u.channels) * 1e-3 for u in pruner.units]
    norms[5][0] = 1e-3
    _set_norms(pruner, norms)
    pruner.config.begin_granularity = 1
    pruner.update_masks(7000)
    assert torch.nonzero(list(pruner.masks().values())[5] == 0).flatten().tolist() == [0]
    norms[5][0] = 5.0  # the row grew back: a rebuild unmasks it and masks the new smallest row
    norms[9][4] = 1e-3
    _set_norms(pruner, norms, clear=False)
    pruner.update_masks(7200)  # current = 1, granularity 1: the walk stops after 2 rows
    assert _masked_pairs(pruner) == {(9, 4), (0, 0)}


def test_growth_limit() -> None:
    assert growth_limit(current=10, needed=100, granularity=4, updates_left=None) == 14
    assert growth_limit(current=10, needed=100, granularity=4, updates_left=9) == 20
    assert growth_limit(current=10, needed=12, granularity=4, updates_left=1) == 14
    assert growth_limit(current=0, needed=100, granularity=4, updates_left=1) == 100


def _small_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def test_proximal_rows_reach_exact_zero_and_stay_there() -> None:
    x = torch.randn(8, 3, 6, 6)
    y = torch.randint(0, 3, (8,))
    session = mslim.prepare(_small_model(), "resrep", example_inputs=x, flops_target=0.6, before_mask_iters=2,
                            mask_interval=2, begin_granularity=2, zeroing_iters=5, lasso_strength=1e-3)
    pruner = session.pruner
    opt = session.optimizer(lr=0.05)
    history: list[torch.Tensor] = []
    for it in range(30):
        loss = nn.functional.cross_entropy(session.model(x), y)
        opt.zero_grad()
        loss.backward()
        session.after_backward()
        opt.step()
        session.step()
        history.append(pruner.bank.row_norms())
    masked_at = pruner._masked_at
    assert pruner.progress()["flops_ratio"] <= 0.6 and (masked_at >= 0).any()
    norms = history[-1]
    assert torch.equal(norms[masked_at >= 0], torch.zeros(int((masked_at >= 0).sum())))
    assert bool((norms[masked_at < 0] > 0.1).all())
    # each masked row is exactly zero from its deadline on (masked at u: zero after the step of u + 5)
    for row in torch.nonzero(masked_at >= 0).flatten().tolist():
        u = int(masked_at[row])
        assert float(history[u + 4][row]) > 0
        assert all(float(h[row]) == 0.0 for h in history[u + 5:])
    # and the shrink before it is linear in the remaining steps (the lasso step adds a little)
    row = int(torch.nonzero(masked_at == masked_at[masked_at >= 0].min()).flatten()[0])
    u = int(masked_at[row])
    assert float(history[u + 3][row]) < float(history[u + 1][row]) * 0.7
    # the momentum of zeroed rows is zero, so plain SGD cannot push them back
    for c, keep in zip(pruner.compactors.values(), pruner.masks().values()):
        buf = opt.state[c.weight]["momentum_buffer"]
        assert torch.equal(buf[keep == 0], torch.zeros_like(buf[keep == 0]))
    assert pruner.zeroed_rows() == pruner.masked_rows()


def test_paper_mode_leaves_masked_rows_nonzero() -> None:
    x = torch.randn(8, 3, 6, 6)
    y = torch.randint(0, 3, (8,))
    session = mslim.prepare(_small_model(), "resrep", example_inputs=x, flops_target=0.6, before_mask_iters=2,
                            mask_interval=2, begin_granularity=2, zeroing="none")
    opt = session.optimizer(lr=0.05)
    for _ in range(12):
        opt.zero_grad()
        nn.functional.cross_entropy(session.model(x), y).backward()
        session.after_backward()
        opt.step()
        session.step()
    pruner = session.pruner
    norms = pruner.bank.row_norms()
    assert pruner.masked_rows() > 0 and bool((norms[pruner._masked_at >= 0] > 0.5).all())
    assert pruner.zeroed_rows() == 0


def test_planned_ramp_reaches_target_by_ramp_end() -> None:
    x = torch.randn(2, 3, 6, 6)
    session = mslim.prepare(_small_model(), "resrep", example_inputs=x, flops_target=0.4, total_iters=200,
                            before_mask_iters=10)
    pruner = session.pruner
    sched = pruner.schedule
    assert sched.planned and sched.ramp_end_iter == 99 and sched.zero_by_iter == 159
    for it in range(200):
        session.step()  # no training: norms only change through the proximal shrink
        if it == sched.ramp_end_iter:
            assert pruner.progress()["flops_ratio"] <= 0.4
        if it < sched.start:
            assert pruner.masked_rows() == 0
    assert pruner.zeroed_rows() == pruner.masked_rows() > 0
    assert torch.equal(pruner.bank.row_norms()[pruner._masked_at >= 0], torch.zeros(pruner.masked_rows()))


def test_finalize_treats_zeroed_rows_as_zero_after_weights_are_replaced() -> None:
    """An EMA copy loaded before finalize only approaches zero: rows the schedule zeroed still go."""
    x = torch.randn(2, 3, 6, 6)
    session = mslim.prepare(_small_model(), "resrep", example_inputs=x, flops_target=0.4, total_iters=100,
                            before_mask_iters=5)
    for _ in range(100):
        session.step()
    pruner = session.pruner
    zeroed = pruner._masked_at >= 0
    assert pruner.zeroed_rows() == int(zeroed.sum()) > 0
    with torch.no_grad():  # what an EMA of the weights would hold: small leftovers on the zeroed rows
        for c, keep in zip(pruner.compactors.values(), pruner.masks().values()):
            c.weight[keep == 0] = 1e-3 * torch.randn_like(c.weight[keep == 0])
    small, report = session.finalize()
    assert report.extra["removed_rows"] == int(zeroed.sum()) and report.flops_ratio <= 0.4
    assert 0 < report.extra["max_output_rel_diff"] < 0.05
