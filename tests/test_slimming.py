"""slimming: the L1 sub-gradient on BN scales is exactly sparsity * sign(gamma); channels go by
|gamma|; every zoo model reaches its FLOPs target after training steps and equals the trained
model with the removed channels zeroed; state, progress, errors, mslim.prune with a loader."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import mslim
from mslim import models
from mslim.data import TensorLoader
from mslim_core import TargetNotReachedWarning
from mslim_core.equivalence import zero_channels
from mslim_core.errors import CheckpointError, ConfigError
from mslim_core.graph import ChannelGraph
from mslim_core.tracing import run_model


class Tiny(nn.Module):
    """conv-bn-relu x3, then a classifier; conv2's output is meant to be ignored in one test."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 10, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = run_model(model, x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def train_steps(session, x: torch.Tensor, steps: int = 2, lr: float = 0.01) -> torch.optim.Optimizer:
    """A few SGD steps on a generic loss (works for classifiers and the detector alike)."""
    opt = session.optimizer(lr=lr)
    for _ in range(steps):
        out = session.model(x)
        out = out if isinstance(out, (tuple, list)) else [out]
        loss = sum(o.float().pow(2).mean() for o in out)
        loss.backward()
        session.after_backward()
        opt.step()
        opt.zero_grad()
        session.step()
    return opt


def test_after_backward_adds_exactly_sparsity_times_sign_gamma() -> None:
    model = Tiny()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.5, -0.3, 0.0, 1.2, -2.0, 0.1, 0.0, -0.7]))
        model.bn3.weight.copy_(torch.linspace(-1, 1, 10))
    x = torch.randn(4, 3, 8, 8)
    session = mslim.prepare(model, algo="slimming", example_inputs=x, sparsity=0.25, ignored_layers=["conv2"])
    assert session.pruner.norm_names == ["bn1", "bn3"]  # bn2 belongs to the ignored conv2
    model(x).pow(2).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    session.after_backward()
    expected_bn1 = 0.25 * torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0, 1.0, 0.0, -1.0])
    expected_bn3 = 0.25 * torch.sign(torch.linspace(-1, 1, 10))
    for name, param in model.named_parameters():
        delta = param.grad - before[name]
        if name == "bn1.weight":
            torch.testing.assert_close(delta, expected_bn1, rtol=0, atol=1e-7)
        elif name == "bn3.weight":
            torch.testing.assert_close(delta, expected_bn3, rtol=0, atol=1e-7)
        else:  # conv weights, BN biases, the ignored layer's BN, the classifier: untouched
            assert torch.equal(delta, torch.zeros_like(delta)), name


def test_penalty_skips_parameters_without_gradient_and_zero_strength_is_a_no_op() -> None:
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    session = mslim.prepare(model, algo="slimming", example_inputs=x, sparsity=0.0)
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    session.after_backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    session = mslim.prepare(Tiny(), algo="slimming", example_inputs=x, sparsity=1e-3)
    session.after_backward()  # no backward yet: no gradient to shape, no error
    assert all(p.grad is None for p in session.model.parameters())


def test_sgd_with_the_penalty_alone_moves_gamma_towards_zero_by_lr_times_sparsity() -> None:
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    session = mslim.prepare(model, algo="slimming", example_inputs=x, sparsity=0.1, gamma_threshold=0.5)
    opt = torch.optim.SGD([model.bn1.weight], lr=0.5)
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, -1.0, 0.2, 2.0, -0.6, 1.0, 1.0, 1.0]))
    start = model.bn1.weight.detach().clone()
    for _ in range(2):
        (model(x) * 0.0).sum().backward()  # zero data gradient: only the penalty acts
        session.after_backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(model.bn1.weight.detach(), start - 2 * 0.5 * 0.1 * torch.sign(start))
    small = session.progress()["small_gamma"]
    # bn1 [0.9, -0.9, 0.1, 1.9, -0.5, ...] has 1 scale below 0.5 of 8; bn2 (6) and bn3 (10) are at 1.0
    assert small == pytest.approx(1 / 24)


def test_channels_with_the_smallest_gamma_are_removed() -> None:
    model = Tiny()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, 1e-3, 0.9, -2e-3, 1.1, 0.8, 5e-4, 1.0]))
    x = torch.randn(2, 3, 8, 8)
    session = mslim.prepare(
        model, algo="slimming", example_inputs=x, flops_target=0.8, ignored_layers=["conv2", "conv3"]
    )
    small, report = session.finalize()
    # MACs per 8x8 position: conv1 27 and conv2 54 per conv1 channel, conv3 540: 3 channels must go
    assert report.extra["removed_channels"] == {"conv1": [1, 3, 6]}
    assert small.conv1.out_channels == 5 and small.bn1.num_features == 5 and small.conv2.in_channels == 5
    torch.testing.assert_close(small.bn1.weight.detach(), torch.tensor([1.0, 0.9, 1.1, 0.8, 1.0]))


@pytest.mark.parametrize("name", models.available())
def test_every_zoo_model_reaches_the_target_and_equals_the_trained_model_zeroed(name: str) -> None:
    model = models.create(name)
    x = models.example_input(name, batch=2)
    reference_shapes = [o.shape for o in outputs(model, x)]
    session = mslim.prepare(model, algo="slimming", example_inputs=x, flops_target=0.5, sparsity=1e-3)
    train_steps(session, x, steps=2)
    trained = copy.deepcopy(session.model)
    small, report = session.finalize()
    assert report.flops_ratio <= 0.5 + 0.01 and report.flops_ratio > 0.4
    assert report.extra["training_steps"] == 2 and report.extra["importance"] == "bn_scale"
    assert [o.shape for o in outputs(small, x)] == reference_shapes
    # the same function as the trained model with the removed channels zeroed
    zeroed = zero_channels(trained, ChannelGraph(trained, x), report.extra["removed_channels"])
    for ref, got in zip(outputs(zeroed, x), outputs(small, x)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6)
    assert report.max_output_diff is not None
    if name == "vgg16_bn":  # the classifier's hidden linear has no BN: not pruned, and said so
        assert any("'classifier.0' is not pruned" in w for w in report.warnings)
    else:
        assert report.warnings == []


def test_unreachable_target_warns() -> None:
    model = models.create("resnet20")
    x = models.example_input("resnet20")
    session = mslim.prepare(model, algo="slimming", example_inputs=x, flops_target=0.05, max_ratio_per_layer=0.5)
    with pytest.warns(TargetNotReachedWarning, match="not reachable"):
        _, report = session.finalize()
    assert report.extra["target_reached"] is False and report.flops_ratio > 0.06


def test_uniform_mode_and_round_to() -> None:
    model = models.create("resnet20")
    x = models.example_input("resnet20")
    session = mslim.prepare(model, algo="slimming", example_inputs=x, flops_target=0.6, mode="uniform", round_to=4)
    small, report = session.finalize()
    assert report.flops_ratio <= 0.61
    for unit, (before, after) in report.layer_widths.items():
        assert after == before or after % 4 == 0, unit


def test_state_dict_round_trip_and_config_errors() -> None:
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    session = mslim.prepare(model, algo="slimming", example_inputs=x, sparsity=1e-3)
    train_steps(session, x, steps=3)
    buffer = io.BytesIO()
    torch.save(session.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = mslim.prepare(copy.deepcopy(model), algo="slimming", example_inputs=x, sparsity=1e-3)
    other.load_state_dict(state)
    assert other.iteration == 3 and other.pruner.steps == 3
    elsewhere = mslim.prepare(Tiny(), algo="slimming", example_inputs=x, ignored_layers=["conv1"])
    with pytest.raises(CheckpointError, match="penalises norm layers"):
        elsewhere.load_state_dict(state)
    with pytest.raises(ConfigError, match="unknown option 'l1' .*Allowed options: .*sparsity"):
        mslim.prepare(Tiny(), algo="slimming", example_inputs=x, l1=1e-4)
    with pytest.raises(ConfigError, match="option 'sparsity' = -1.0 is invalid"):
        mslim.prepare(Tiny(), algo="slimming", example_inputs=x, sparsity=-1.0)
    _, report = session.finalize()
    assert session.state_dict()["pruner"]["removals"] == report.extra["removals"]


def test_mslim_prune_with_a_loader() -> None:
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=4)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 4, (16,))
    loader = TensorLoader(images, labels, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetNotReachedWarning)
        small, report = mslim.prune(
            model,
            algo="slimming",
            example_inputs=images[:2],
            train_loader=loader,
            epochs=1,
            flops_target=0.6,
            train_options={"progress": False},
        )
    assert report.flops_ratio <= 0.61 and report.extra["training_steps"] == 2
    assert small(images[:2]).shape == (2, 4)
