"""ResRep gradient resetting: mask + group lasso on every compactor, against the formula by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mslim


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 3, 1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2),
    )


def _session(lasso: float = 0.05):
    x = torch.randn(4, 3, 6, 6)
    session = mslim.prepare(_model(), "resrep", example_inputs=x, lasso_strength=lasso)
    pruner = session.pruner
    assert [u.name for u in pruner.units] == ["3", "6", "9"]  # widths 5, 5, 3: two width groups
    torch.manual_seed(4)
    with torch.no_grad():
        for c in pruner.compactors.values():
            c.weight.copy_(torch.randn_like(c.weight))
        comps = list(pruner.compactors.values())
        comps[0].weight[1].zero_()  # a zero row that will be masked
        comps[2].weight[0].zero_()  # a zero row that is not masked
    masked_at = torch.full((pruner.bank.num_rows,), -1, dtype=torch.int64)
    masked_at[[1, 3, 7, 12]] = 0  # rows 1 and 3 of layer "3", row 2 of "6", row 2 of "9"
    pruner._masked_at = masked_at
    pruner._refresh_masks()
    return session, x


def _expected(pruner, raw: dict[str, torch.Tensor], lasso: float) -> dict[str, torch.Tensor]:
    masks = pruner.masks()
    out = {}
    for name, c in pruner.compactors.items():
        q = c.weight.detach().double().view(c.out_channels, -1)
        g = raw[name].double().view(c.out_channels, -1)
        norms = q.norm(dim=1, keepdim=True)
        lasso_term = torch.where(norms > 0, q / norms.clamp_min(1e-300), torch.zeros_like(q))
        out[name] = (masks[name].double()[:, None] * g + lasso * lasso_term).view_as(c.weight)
    return out


def test_gradients_match_formula_including_masked_and_zero_rows() -> None:
    lasso = 0.05
    session, x = _session(lasso)
    pruner = session.pruner
    loss = session.model(x).square().sum()
    loss.backward()
    raw = {n: c.weight.grad.clone() for n, c in pruner.compactors.items()}
    others = {n: p.grad.clone() for n, p in session.model.named_parameters() if "compactor" not in n}
    session.after_backward()
    expected = _expected(pruner, raw, lasso)
    for name, c in pruner.compactors.items():
        assert torch.isfinite(c.weight.grad).all()
        torch.testing.assert_close(c.weight.grad.double(), expected[name], rtol=1e-5, atol=1e-7)
    comps = pruner.compactors
    assert torch.equal(comps["3"].weight.grad[1], torch.zeros_like(comps["3"].weight.grad[1]))  # masked + zero
    row = comps["3"].weight[3].detach()
    torch.testing.assert_close(comps["3"].weight.grad[3], lasso * row / row.norm())  # masked: lasso only
    torch.testing.assert_close(comps["9"].weight.grad[0], raw["9"][0])  # zero row, unmasked: task grad only
    for n, p in session.model.named_parameters():  # nothing else is touched
        if "compactor" not in n:
            assert torch.equal(p.grad, others[n])


def test_missing_gradient_counts_as_zero() -> None:
    session, _ = _session(0.1)
    pruner = session.pruner
    session.after_backward()  # no backward at all: grads are None
    expected = _expected(pruner, {n: torch.zeros_like(c.weight) for n, c in pruner.compactors.items()}, 0.1)
    for name, c in pruner.compactors.items():
        torch.testing.assert_close(c.weight.grad.double(), expected[name], rtol=1e-5, atol=1e-7)


def test_zero_lasso_only_masks() -> None:
    session, x = _session(0.0)
    pruner = session.pruner
    session.model(x).sum().backward()
    raw = {n: c.weight.grad.clone() for n, c in pruner.compactors.items()}
    session.after_backward()
    for name, c in pruner.compactors.items():
        torch.testing.assert_close(c.weight.grad, raw[name] * pruner.masks()[name][:, None, None, None])


def test_amp_recipe_applies_lasso_to_unscaled_gradients() -> None:
    lasso = 0.05
    session, x = _session(lasso)
    pruner = session.pruner
    opt = session.optimizer(lr=0.1)
    session.model(x).square().sum().backward()
    raw = {n: c.weight.grad.clone() for n, c in pruner.compactors.items()}
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(session.model(x).square().sum()).backward()
    scaler.unscale_(opt)  # documented order: unscale, then after_backward, then step
    session.after_backward()
    expected = _expected(pruner, raw, lasso)
    for name, c in pruner.compactors.items():
        torch.testing.assert_close(c.weight.grad.double(), expected[name], rtol=1e-4, atol=1e-6)
    before = {n: c.weight.detach().clone() for n, c in pruner.compactors.items()}
    scaler.step(opt)
    scaler.update()
    for name, c in pruner.compactors.items():  # a plain SGD step with momentum 0.99 from a zero buffer
        torch.testing.assert_close(c.weight.detach(), before[name] - 0.1 * expected[name].float(), rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_rows_give_bounded_lasso(dtype: torch.dtype) -> None:
    session, x = _session(1.0)
    pruner = session.pruner
    session.model.to(dtype)
    with torch.no_grad():
        pruner.compactors["6"].weight[0].fill_(1e-30)  # squared norm underflows in float32
    session.model(x.to(dtype)).sum().backward()
    session.after_backward()
    for c in pruner.compactors.values():
        assert torch.isfinite(c.weight.grad).all()
    g = pruner.compactors["6"].weight.grad[0]
    assert float(g.abs().max()) < 100.0  # the lasso part is at most 1 per entry, never ~1e30
