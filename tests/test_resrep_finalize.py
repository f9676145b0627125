"""ResRep conversion: BN and compactors folded, zero rows removed, outputs equal to the wrapped model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mslim
import mslim.models as zoo
from mslim_core.cost import count_cost
from mslim_core.errors import MslimError, TargetNotReachedWarning
from mslim_resrep import Compactor
from mslim_resrep.finalize import rows_to_keep


CASES = {
    "resnet56": (["fc"], (2, 3, 32, 32)),
    "resnet50": (["fc"], (2, 3, 32, 32)),
    "mobilenet_v2": (["classifier"], (2, 3, 32, 32)),
    "yolo_elan": (["heads"], (2, 3, 64, 64)),
}


def _randomise(session, zero_fraction: float = 0.4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random compactors with some exactly-zero rows, and BNs with random statistics everywhere."""
    g = torch.Generator().manual_seed(seed)
    zeroed = {}
    with torch.no_grad():
        for name, c in session.pruner.compactors.items():
            d = c.out_channels
            c.weight.copy_(torch.randn(c.weight.shape, generator=g) / d**0.5)
            rows = torch.rand(d, generator=g) < zero_fraction
            c.weight[rows] = 0
            zeroed[name] = rows
        for m in session.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return zeroed


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", list(CASES))
def test_finalize_equals_wrapped_model(name: str) -> None:
    torch.manual_seed(0)
    ignored, shape = CASES[name]
    model = zoo.create(name)
    x = torch.randn(*shape)
    original = copy.deepcopy(model)
    session = mslim.prepare(model, "resrep", example_inputs=x, ignored_layers=ignored)
    zeroed = _randomise(session)
    wrapped_out = _outputs(session.model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)
        small, report = session.finalize()
    # outputs equal the wrapped model's, relative to their scale
    for a, b in zip(wrapped_out, _outputs(small, x)):
        assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    assert report.extra["max_output_rel_diff"] < 1e-4 and report.max_output_diff is not None
    # the cost model predicted exactly what a real count finds; 'before' is the original model
    after = count_cost(small, x)
    assert report.macs_after == after.macs == report.extra["predicted_macs"]
    assert report.params_after == after.params
    before = count_cost(original, x)
    assert (report.macs_before, report.params_before) == (before.macs, before.params)
    # a plain model: no compactor, no BN on the pruned units; widths follow the zero rows
    modules = dict(small.named_modules())
    assert not any(isinstance(m, Compactor) for m in small.modules())
    for unit in session.pruner.units:
        conv = modules[unit.name]
        assert type(conv) is nn.Conv2d and conv.bias is not None
        assert isinstance(modules[unit.norm_name], nn.Identity)
        kept = conv.out_channels
        assert report.layer_widths[unit.name] == (unit.channels, kept)
        expected = max(1, int((~zeroed[unit.name]).sum()))
        assert kept == expected or (name == "mobilenet_v2" and kept >= expected)
    assert report.extra["removed_rows"] == sum(c - k for c, k in report.layer_widths.values())
    # the wrapped model is untouched
    for a, b in zip(wrapped_out, _outputs(session.model, x)):
        assert torch.equal(a, b)


def test_mobilenet_constants_folded_into_next_layer() -> None:
    """An expand conv's zero row still feeds the project conv a constant (depthwise BN shift): folded."""
    torch.manual_seed(1)
    model = zoo.create("mobilenet_v2")
    x = torch.randn(2, 3, 32, 32)
    session = mslim.prepare(model, "resrep", example_inputs=x, ignored_layers=["classifier"])
    _randomise(session, seed=1)
    wrapped_out = _outputs(session.model, x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)
        small, report = session.finalize()
    project = small.features[3].project.conv
    assert project.bias is not None  # gained a bias holding the removed channels' constant
    assert report.extra["zero_rows_kept_for_constants"] == 0
    torch.testing.assert_close(_outputs(small, x)[0], wrapped_out, rtol=1e-4, atol=1e-4 * float(wrapped_out.abs().max()))


def test_round_to_keeps_strongest_rows_and_stays_exact() -> None:
    torch.manual_seed(2)
    model = zoo.create("resnet20")
    x = torch.randn(2, 3, 32, 32)
    session = mslim.prepare(model, "resrep", example_inputs=x, ignored_layers=["fc"], round_to=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for c in session.pruner.compactors.values():
            c.weight.copy_(torch.randn(c.weight.shape, generator=g) / c.out_channels**0.5)
            small_rows = torch.randperm(c.out_channels, generator=g)[: c.out_channels // 2 + 1]
            c.weight[small_rows] *= 1e-9  # far below the threshold, but not zero: ordered by size
    norms = {n: c.row_norms() for n, c in session.pruner.compactors.items()}
    wrapped_out = _outputs(session.model, x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)
        small, report = session.finalize()
    modules = dict(small.named_modules())
    for name, n in norms.items():
        kept = modules[name].out_channels
        strong = int((n >= 1e-5).sum())
        assert kept % 8 == 0 and kept >= strong and kept - strong < 8
        assert kept == min(len(n), -(-strong // 8) * 8)
        assert report.layer_widths[name] == (len(n), kept)
    assert report.extra["max_output_rel_diff"] < 1e-4
    torch.testing.assert_close(_outputs(small, x)[0], wrapped_out, rtol=1e-4, atol=1e-5)


def test_rows_to_keep() -> None:
    n = torch.tensor([0.0, 3e-6, 0.5, 2e-5, 1e-7, 0.0, 4e-6, 0.2])
    assert rows_to_keep(n, 1e-5).tolist() == [False, False, True, True, False, False, False, True]
    keep4 = rows_to_keep(n, 1e-5, round_to=4)  # 3 strong -> 4: the strongest of the rest (4e-6) joins
    assert keep4.tolist() == [False, False, True, True, False, False, True, True]
    assert rows_to_keep(torch.tensor([0.0, 1e-8, 3e-9]), 1e-5).tolist() == [False, True, False]
    assert rows_to_keep(torch.tensor([0.0, 1e-8, 3e-9]), 1e-5, round_to=8).all()


def test_report_counts_masked_rows_above_threshold_and_warns() -> None:
    torch.manual_seed(4)
    model = zoo.create("resnet20")
    x = torch.randn(1, 3, 32, 32)
    session = mslim.prepare(model, "resrep", example_inputs=x, ignored_layers=["fc"], flops_target=0.5)
    pruner = session.pruner
    pruner._masked_at[:40] = 0  # 40 masked rows, of which 10 are zero
    pruner._refresh_masks()
    with torch.no_grad():
        first = next(iter(pruner.compactors.values()))
        first.weight[:10] = 0
    with pytest.warns(TargetNotReachedWarning, match="30 masked row"):
        small, report = session.finalize()
    assert report.extra["masked_rows"] == 40 and report.extra["masked_rows_above_threshold"] == 30
    assert report.extra["removed_rows"] == 10 and report.flops_ratio > 0.5
    assert report.warnings and "30 masked row" in report.warnings[0]
    with pytest.raises(MslimError, match="already finalized"):
        session.step()
