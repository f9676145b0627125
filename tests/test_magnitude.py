"""magnitude: every zoo model reaches its FLOPs target and equals the original with the removed
channels zeroed; modes, round_to, limits, unreachable targets, torch-pruning parity, plugins."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import mslim
from mslim import models
from mslim_core import MslimWarning, TargetNotReachedWarning, hookimpl
from mslim_core.cost import CostModel, count_cost
from mslim_core.equivalence import zero_channels
from mslim_core.errors import ConfigError, GraphError, UnknownImportanceError
from mslim_core.graph import ChannelGraph
from mslim_core.importance import Importance, filter_rows, get_importance, reduce_group, score_units
from mslim_core.plugins import get_plugin_manager
from mslim_core.selection import select_channels
from mslim_core.tracing import run_model


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = run_model(model, x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def randomise_bn(model: nn.Module) -> None:
    """BN statistics and affine parameters away from their defaults, so zeroing must be exact."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def prune(name: str, **options):
    model = models.create(name)
    randomise_bn(model)
    x = models.example_input(name)
    original = copy.deepcopy(model)
    small, report = mslim.prune(model, algo="magnitude", example_inputs=x, **options)
    return original, small, report, x


def assert_equals_zeroed(original: nn.Module, small: nn.Module, report, x: torch.Tensor) -> None:
    """The pruned model computes what the original computes with the removed channels zeroed."""
    graph = ChannelGraph(original, x)
    zeroed = zero_channels(original, graph, report.extra["removed_channels"])
    for ref, got in zip(outputs(zeroed, x), outputs(small, x)):
        assert ref.shape == got.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6)


@pytest.mark.parametrize("name", models.available())
def test_every_zoo_model_reaches_the_target(name: str) -> None:
    original, small, report, x = prune(name, flops_target=0.5)
    assert report.flops_ratio <= 0.5 + 0.01
    assert report.flops_ratio > 0.4  # not pruned far past the target
    assert report.macs_after == count_cost(small, x).macs
    assert report.extra["predicted_macs"] == report.macs_after
    assert [o.shape for o in outputs(small, x)] == [o.shape for o in outputs(original, x)]
    assert report.warnings == [] and report.extra["units_pruned"] > 0
    assert_equals_zeroed(original, small, report, x)


@pytest.mark.parametrize("name", ["resnet56", "mobilenet_v2", "yolo_elan"])
def test_uniform_mode_on_residual_and_concat_models(name: str) -> None:
    original, small, report, x = prune(name, flops_target=0.45, mode="uniform", importance="l2")
    assert report.flops_ratio <= 0.46
    ratio = report.extra["uniform_ratio"]
    for unit, (before, after) in report.layer_widths.items():
        assert after == max(1, min(before, math.floor(before * (1 - ratio)))), unit
    assert_equals_zeroed(original, small, report, x)


def test_global_and_uniform_differ() -> None:
    _, _, global_report, _ = prune("resnet20", flops_target=0.5)
    _, _, uniform_report, _ = prune("resnet20", flops_target=0.5, mode="uniform")
    kept = lambda r: {u: a / b for u, (b, a) in r.layer_widths.items()}  # noqa: E731
    assert len(set(round(v, 6) for v in kept(uniform_report).values())) <= 3  # one ratio, floor rounding
    assert len(set(round(v, 6) for v in kept(global_report).values())) > 3  # per-layer ratios differ
    assert global_report.flops_ratio <= 0.5 and uniform_report.flops_ratio <= 0.5


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_round_to_keeps_multiples(mode: str) -> None:
    original, small, report, x = prune("vgg16_bn", flops_target=0.4, round_to=8, mode=mode)
    assert report.flops_ratio <= 0.41
    changed = {u: a for u, (b, a) in report.layer_widths.items() if a != b}
    assert changed and all(a % 8 == 0 for a in changed.values())


def test_max_ratio_and_min_channels_respected() -> None:
    _, small, report, _ = prune("resnet20", flops_target=0.6, max_ratio_per_layer=0.4, min_channels=12)
    for unit, (before, after) in report.layer_widths.items():
        assert after >= max(12 if before >= 12 else before, math.ceil(0.6 * before)), unit
    assert report.flops_ratio <= 0.61


def test_unreachable_target_warns_and_reports_why() -> None:
    with pytest.warns(TargetNotReachedWarning, match="not reachable"):
        _, small, report, x = prune("resnet20", flops_target=0.05, max_ratio_per_layer=0.5)
    assert report.flops_ratio > 0.06
    assert any("not reachable" in w and "max_ratio_per_layer=0.5" in w for w in report.warnings)
    assert report.extra["target_reached"] is False
    for unit, (before, after) in report.layer_widths.items():  # the best reachable plan: all at the limit
        assert after == math.ceil(before / 2), unit


def test_ignored_layers_and_coupled_switch() -> None:
    _, _, report, _ = prune("resnet20", flops_target=0.6, ignored_layers=["layer1.0.conv1"])
    assert "layer1.0.conv1" not in report.layer_widths
    model = models.create("resnet20")
    x = models.example_input("resnet20")
    small, report = mslim.prune(model, algo="magnitude", example_inputs=x, flops_target=0.6, prune_coupled=False)
    assert small.conv1.out_channels == 16 and small.layer3[0].conv2.out_channels == 64
    assert report.flops_ratio <= 0.61


def test_config_errors() -> None:
    model = models.create("resnet20")
    x = models.example_input("resnet20")
    with pytest.raises(UnknownImportanceError, match=r"unknown importance 'fgpm'\. Did you mean 'fpgm'\?.*Available: "):
        mslim.prepare(model, algo="magnitude", example_inputs=x, importance="fgpm")
    with pytest.raises(ConfigError, match="unknown option 'round' .*did you mean 'round_to'"):
        mslim.prepare(model, algo="magnitude", example_inputs=x, round=8)
    with pytest.raises(ConfigError, match="option 'mode' = 'local' is invalid"):
        mslim.prepare(model, algo="magnitude", example_inputs=x, mode="local")


def test_bn_scale_skips_units_without_a_norm_and_state_dict_is_safe() -> None:
    model = models.create("vgg16_bn")
    x = models.example_input("vgg16_bn")
    session = mslim.prepare(model, algo="magnitude", example_inputs=x, importance="bn_scale", flops_target=0.5)
    small, report = session.finalize()
    assert any("'classifier.0' is not pruned" in w for w in report.warnings)
    assert small.classifier[0].out_features == 512 and report.flops_ratio <= 0.5
    buffer = io.BytesIO()
    torch.save(session.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["pruner"]["removals"] and state["pruner"]["finalized"] is True


def test_taylor_importance_after_a_backward_pass() -> None:
    model = models.create("resnet20")
    x = models.example_input("resnet20", batch=4)
    with pytest.raises(ConfigError, match="importance 'taylor' needs gradients"):
        mslim.prune(copy.deepcopy(model), algo="magnitude", example_inputs=x, importance="taylor")
    model(x).logsumexp(1).sum().backward()
    small, report = mslim.prune(model, algo="magnitude", example_inputs=x, importance="taylor", flops_target=0.5)
    assert report.flops_ratio <= 0.5 and report.extra["importance"] == "taylor"


def test_same_channels_as_torch_pruning_local_l2_on_resnet56() -> None:
    """Uniform ratio + L2 = torch-pruning's GroupMagnitudeImportance(p=2) local pruning at that ratio.

    torch-pruning scores a group by its root layer only (group_reduction="first"); mslim combines
    every producer of a coupled group (mean of per-layer normalised norms). So the 27 independent
    units must match exactly; the 3 coupled stage groups keep the same number of channels, and
    their indices are checked against mslim's documented reduction by hand.
    """
    tp = pytest.importorskip("torch_pruning")
    model = models.create("resnet56")
    x = models.example_input("resnet56")
    reference = copy.deepcopy(model)
    graph = ChannelGraph(model, x)
    cost = CostModel(model, x, graph.units)
    scores = score_units(get_importance("l2"), graph, model, graph.units)
    ours = select_channels(cost, scores, 0.5, mode="uniform")
    assert ours.ratio is not None and ours.reached

    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="first", normalizer=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(
            reference, x, importance=importance, pruning_ratio=ours.ratio, global_pruning=False,
            ignored_layers=[reference.fc],
        )
        names = {m: n for n, m in reference.named_modules()}
        theirs = {names[g[0].dep.target.module]: sorted(g[0].idxs) for g in pruner.step(interactive=True)}

    independent = [u for u in graph.units if u.independent]
    assert len(independent) == 27
    for unit in independent:
        assert ours.removed[unit.name].tolist() == theirs[unit.name], unit.name
    coupled = graph.coupled_units()
    assert len(coupled) == 3
    for unit in coupled:
        root = next(p for p in unit.producers if p in theirs)
        assert ours.removed[unit.name].numel() == len(theirs[root])
        norms = [filter_rows(model.get_submodule(p)).double().norm(dim=1) for p in unit.producers]
        k = ours.removed[unit.name].numel()
        by_hand = torch.argsort(reduce_group(norms), stable=True)[:k].sort().values
        assert ours.removed[unit.name].tolist() == by_hand.tolist()


class FirstChannelsFirst(Importance):
    """A test criterion: channel i scores i, so the first channels go first."""

    name = "index"
    description = "channel index"

    def scores(self, graph, unit, model):  # type: ignore[no-untyped-def]
        return torch.arange(unit.channels, dtype=torch.float32)


class IndexPlugin:
    @hookimpl
    def mslim_register_importances(self, register):  # type: ignore[no-untyped-def]
        register(FirstChannelsFirst())


def test_a_plugin_registers_a_criterion_that_magnitude_uses_by_name(fresh_plugins) -> None:
    get_plugin_manager().register(IndexPlugin(), name="test-index-importance")
    model = models.create("resnet20")
    x = models.example_input("resnet20")
    small, report = mslim.prune(model, algo="magnitude", example_inputs=x, importance="index", mode="uniform")
    assert report.extra["importance"] == "index"
    for unit, removed in report.extra["removed_channels"].items():
        assert removed == list(range(len(removed))), unit


def test_model_without_prunable_layers_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(GraphError, match=r"magnitude found no prunable layer in the model \('1': its channels are model outputs"):
        mslim.prune(model, algo="magnitude", example_inputs=torch.randn(1, 3, 2, 2))


def test_all_zero_scores_warn_and_are_reported() -> None:
    model = models.create("resnet20")
    with torch.no_grad():
        model.layer1[0].conv1.weight.zero_()
    with pytest.warns(MslimWarning, match=r"importance 'l1': every channel of 1 unit\(s\) scored zero \('layer1.0.conv1'\): ties"):
        small, report = mslim.prune(model, algo="magnitude", example_inputs=models.example_input("resnet20"))
    assert any("scored zero" in w for w in report.warnings)
