"""ResRep preparation: where compactors go, identity at start, parameter groups and options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mslim
import mslim.models as zoo
from mslim_core.errors import ConfigError, GraphError, TargetNotReachedWarning
from mslim_resrep import COMPACTOR_GROUP, Compacted, Compactor, ResRepPruner, set_momentum


def _outputs(model: nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def _prepare(name: str, **options):
    torch.manual_seed(0)
    model = zoo.create(name)
    x = zoo.example_input(name, batch=1)
    if name == "resnet50":
        x = torch.randn(1, 3, 32, 32)  # small input: the structure is what matters here
    head = {"yolo_elan": ["heads"], "mobilenet_v2": ["classifier"]}.get(name, ["fc"])
    original = copy.deepcopy(model)
    session = mslim.prepare(model, "resrep", example_inputs=x, ignored_layers=head, **options)
    return session, original, x


@pytest.fixture(scope="module")
def resnet56():
    return _prepare("resnet56")


@pytest.fixture(scope="module")
def mobilenet():
    return _prepare("mobilenet_v2")


def test_registered_through_entry_point() -> None:
    info = {a.name: a for a in mslim.algorithms()}
    assert info["resrep"].trains is True
    from mslim.api import pruner_class

    assert pruner_class("resrep") is ResRepPruner


@pytest.mark.parametrize("which", ["resnet56", "mobilenet"])
def test_wrapped_outputs_equal_original(which: str, request: pytest.FixtureRequest) -> None:
    session, original, x = request.getfixturevalue(which)
    x = torch.cat([x, torch.randn_like(x)])
    for a, b in zip(_outputs(original, x), _outputs(session.model, x)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_resnet56_first_conv_of_each_block(resnet56) -> None:
    session, _, _ = resnet56
    names = [u.name for u in session.pruner.units]
    assert len(names) == 27
    assert names == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)]
    # the compactor sits after the BN, before the activation, and the BN keeps sensible keys
    block = session.model.layer2.get_submodule("3")
    assert isinstance(block.bn1, Compacted) and isinstance(block.bn1.compactor, Compactor)
    assert isinstance(block.bn1.bn, nn.BatchNorm2d) and isinstance(block.bn2, nn.BatchNorm2d)
    keys = session.model.state_dict().keys()
    assert "layer2.3.bn1.bn.running_var" in keys and "layer2.3.bn1.compactor.weight" in keys
    assert sum(isinstance(m, Compactor) for m in session.model.modules()) == 27


def test_resnet50_two_convs_per_bottleneck_and_stem_option() -> None:
    session, _, _ = _prepare("resnet50")
    names = [u.name for u in session.pruner.units]
    assert len(names) == 32
    assert all(n.endswith(("conv1", "conv2")) and n.startswith("layer") for n in names)
    assert "stem" in session.pruner.skipped["conv1"]
    with_stem, _, _ = _prepare("resnet50", include_stem=True)
    assert len(with_stem.pruner.units) == 33 and with_stem.pruner.units[0].name == "conv1"


def test_bn_inside_sequential_and_no_depthwise(mobilenet) -> None:
    session, _, _ = mobilenet
    units = session.pruner.units
    assert units and all(".depthwise." not in u.name for u in units)
    expand = session.model.features[2].expand  # ConvBNAct: conv, bn, act in an nn.Sequential
    assert isinstance(expand.bn, Compacted) and list(expand._modules) == ["conv", "bn", "act"]
    assert "features.0.conv" not in {u.name for u in units}  # the stem


def test_conv_without_bn_gets_compactor_after_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=True), nn.ReLU(),
        nn.Conv2d(12, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )
    x = torch.randn(2, 3, 8, 8)
    original = copy.deepcopy(model)
    session = mslim.prepare(model, "resrep", example_inputs=x, ignored_layers=["7"])
    names = [u.name for u in session.pruner.units]
    assert names == ["2", "4"]
    wrapper = session.model[2]
    assert isinstance(wrapper, Compacted) and isinstance(wrapper.conv, nn.Conv2d) and wrapper.role == "conv"
    torch.testing.assert_close(_outputs(session.model, x)[0], _outputs(original, x)[0], rtol=0, atol=0)


def test_ignored_layers_are_honoured() -> None:
    model = zoo.create("resnet56")
    s2 = mslim.prepare(model, "resrep", example_inputs=zoo.example_input("resnet56"),
                       ignored_layers=["fc", "layer1.0.conv1", model.layer3[8].conv1])
    names = {u.name for u in s2.pruner.units}
    assert len(names) == 25 and "layer1.0.conv1" not in names and "layer3.8.conv1" not in names
    assert "ignored" in s2.pruner.skipped["layer1.0.conv1"]


def test_prepared_model_refused_again(resnet56) -> None:
    session, _, x = resnet56
    with pytest.raises(GraphError, match="already holds ResRep compactors"):
        mslim.prepare(session.model, "resrep", example_inputs=x, ignored_layers=["fc"])


def test_param_groups_momentum_and_decay(mobilenet) -> None:
    session, _, _ = mobilenet
    opt = session.optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay", COMPACTOR_GROUP}
    comp = groups[COMPACTOR_GROUP]
    assert comp["momentum"] == 0.99 and comp["weight_decay"] == 0.0
    assert {id(p) for p in comp["params"]} == {id(c.weight) for c in session.pruner.compactors.values()}
    assert groups["decay"]["momentum"] == 0.9 and groups["decay"]["weight_decay"] == 5e-4
    assert groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    decay = {id(p) for p in groups["decay"]["params"]}
    model = session.model
    dw = model.features[3].depthwise.conv
    assert dw.groups == dw.in_channels > 1 and id(dw.weight) in no_decay  # depthwise conv: no decay
    assert id(model.features[3].expand.bn.bn.weight) in no_decay  # BN inside the compacted wrapper
    assert id(model.classifier.bias) in no_decay and id(model.classifier.weight) in decay
    assert id(model.features[3].expand.conv.weight) in decay
    every = [p for g in opt.param_groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))


def test_set_momentum_keeps_compactor_momentum(resnet56) -> None:
    session, _, _ = resnet56
    opt = session.optimizer(lr=0.1)
    set_momentum(opt, 0.5)
    for g in opt.param_groups:
        assert g["momentum"] == (0.99 if g["name"] == COMPACTOR_GROUP else 0.5)


def test_config_defaults_and_errors(resnet56) -> None:
    session, _, _ = resnet56
    c = session.config
    assert (c.flops_target, c.lasso_strength, c.mask_interval, c.begin_granularity) == (0.471, 1e-4, 200, 4)
    assert (c.num_at_least, c.threshold, c.include_stem, c.round_to, c.zeroing) == (1, 1e-5, False, 1, "proximal")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="lasso_strenght"):
        mslim.prepare(model, "resrep", example_inputs=x, lasso_strenght=1e-3)
    with pytest.raises(ConfigError, match="zero_by"):
        mslim.prepare(model, "resrep", example_inputs=x, ramp_end=0.7, zero_by=0.5)
    with pytest.raises(ConfigError, match="zeroing"):
        mslim.prepare(model, "resrep", example_inputs=x, zeroing="sometimes")
    with pytest.raises(ConfigError, match="flops_target"):
        mslim.prepare(model, "resrep", example_inputs=x, flops_target="0.5x")


def test_schedule_resolution() -> None:
    from mslim_resrep.config import DEFAULT_BEFORE_MASK_ITERS, ResRepConfig, resolve_schedule

    paper = resolve_schedule(ResRepConfig(zeroing="none"))
    assert (paper.start, paper.interval, paper.planned) == (DEFAULT_BEFORE_MASK_ITERS, 200, False)
    epochs = resolve_schedule(ResRepConfig(iters_per_epoch=781, zeroing="none"))
    assert epochs.start == 5 * 781
    # the paper's own schedule (480 epochs of 781 iterations) keeps the paper's interval when planned
    long = resolve_schedule(ResRepConfig(iters_per_epoch=781, total_iters=480 * 781))
    assert long.planned and long.interval == 200 and long.start == 3905
    short = resolve_schedule(ResRepConfig(iters_per_epoch=23, total_iters=690))
    assert short.start == 115 and short.interval == 4 and short.ramp_end_iter == 344 and short.zero_by_iter == 551
    assert short.zeroing_iters == 551 - 344
    assert short.is_update(115) and short.is_update(119) and not short.is_update(117) and not short.is_update(111)


def test_plan_fills_unset_length_only() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(TargetNotReachedWarning, match="num_at_least"):  # one 4-channel layer cannot reach 0.471
        session = mslim.prepare(model, "resrep", example_inputs=x)
    assert not session.pruner.schedule.planned
    session.pruner.plan(1000, iters_per_epoch=50)
    assert session.config.total_iters == 1000 and session.pruner.schedule.planned
    assert session.pruner.schedule.start == 200  # 5 epochs = 250, capped at 20% of the run
    session.pruner.plan(5000)
    assert session.config.total_iters == 1000  # an explicit (or earlier) length is kept


def test_units_tied_by_grouped_convs_or_chunks_get_no_compactor() -> None:
    """Per-row masks cannot keep tied sets, so such units are left out (and finalize still works)."""
    from mslim.data import TensorLoader
    from tests.test_tied_selection import tied_net

    x = torch.randn(64, 3, 8, 8)
    session = mslim.prepare(tied_net(), algo="resrep", example_inputs=x[:2], flops_target=0.6)
    skipped = session.pruner.skipped
    for name in ("a1", "c1"):  # a1 feeds the grouped a2; c1's output passes chunk(2)
        assert "can only be removed in tied sets" in skipped[name], name
    assert skipped["a2"] == "it is a grouped or depthwise conv (groups=4)"
    assert [u.name for u in session.pruner.units] == ["a3", "m", "c2"]

    labels = torch.randint(0, 10, (64,))
    small, report = mslim.prune(tied_net(), algo="resrep", example_inputs=x[:2], flops_target=0.6,
                                train_loader=TensorLoader(x, labels, 16), epochs=3,
                                train_options={"lr": 0.05, "progress": False})
    assert set(report.layer_widths) == {"a3", "m", "c2"}
    assert report.macs_after / report.macs_before <= 0.6 + 0.01
