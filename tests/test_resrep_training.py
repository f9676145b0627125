"""ResRep in real training loops: exact resume from a checkpoint, and a short run on digits."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mslim
import mslim.models as zoo
from mslim.data import load_dataset, make_loaders
from mslim_core.errors import CheckpointError


def _small_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


_X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(12))
_Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(13))
_OPTIONS = dict(flops_target=0.5, total_iters=60, before_mask_iters=6, lasso_strength=1e-3)


def _run(session, opt, start: int, stop: int) -> None:
    for it in range(start, stop):
        idx = torch.arange(it * 16, it * 16 + 16) % 64
        for group in opt.param_groups:
            group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * it / 60))
        opt.zero_grad()
        F.cross_entropy(session.model(_X[idx]), _Y[idx]).backward()
        session.after_backward()
        opt.step()
        session.step()


def test_resume_mid_run_gives_same_masks_and_model() -> None:
    full = mslim.prepare(_small_model(), "resrep", example_inputs=_X[:2], **_OPTIONS)
    opt = full.optimizer(lr=0.05)
    _run(full, opt, 0, 60)
    full_small, full_report = full.finalize()

    first = mslim.prepare(_small_model(), "resrep", example_inputs=_X[:2], **_OPTIONS)
    opt1 = first.optimizer(lr=0.05)
    _run(first, opt1, 0, 27)  # stop in the middle of the masking ramp
    assert first.pruner.masked_rows() > 0
    buffer = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "optimizer": opt1.state_dict(), "session": first.state_dict()},
               buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = mslim.prepare(_small_model(), "resrep", example_inputs=_X[:2], **_OPTIONS)
    resumed.model.load_state_dict(checkpoint["model"])
    opt2 = resumed.optimizer(lr=0.05)
    opt2.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["session"])
    assert resumed.iteration == 27
    assert torch.equal(resumed.pruner._masked_at, first.pruner._masked_at)
    _run(resumed, opt2, 27, 60)

    assert torch.equal(resumed.pruner._masked_at, full.pruner._masked_at)
    for (k, a), (k2, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    small, report = resumed.finalize()
    for (k, a), (k2, b) in zip(full_small.state_dict().items(), small.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert report.layer_widths == full_report.layer_widths and report.flops_ratio <= 0.5


def test_resume_refuses_other_layers() -> None:
    session = mslim.prepare(_small_model(), "resrep", example_inputs=_X[:2], **_OPTIONS)
    state = session.state_dict()
    other = mslim.prepare(_small_model(), "resrep", example_inputs=_X[:2], ignored_layers=["3"], **_OPTIONS)
    with pytest.raises(CheckpointError, match="other compacted layers"):
        other.load_state_dict(state)


def _accuracy(model: nn.Module, loader) -> tuple[int, torch.Tensor]:
    model.eval()
    correct, logits = 0, []
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            logits.append(out)
            correct += int((out.argmax(1) == y).sum())
    return correct, torch.cat(logits)


def test_short_digits_run_zeroes_masked_rows_and_keeps_accuracy() -> None:
    """ResNet-20 on scikit-learn digits, 12 epochs from scratch, default options plus the run's length."""
    torch.manual_seed(0)
    splits = load_dataset("digits")
    train, val = make_loaders(splits, 64, seed=0)
    epochs = 12
    model = zoo.create("resnet20", in_channels=1)
    session = mslim.prepare(model, "resrep", example_inputs=splits.train_images[:2], ignored_layers=["fc"],
                            total_iters=epochs * len(train), iters_per_epoch=len(train))
    opt = session.optimizer(lr=0.05)
    total, it = epochs * len(train), 0
    session.model.train()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train:
            for group in opt.param_groups:
                group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * it / total))
            opt.zero_grad()
            F.cross_entropy(session.model(x), y).backward()
            session.after_backward()
            opt.step()
            session.step()
            it += 1
    pruner = session.pruner
    masked = pruner._masked_at >= 0
    assert int(masked.sum()) > 100
    assert torch.equal(pruner.bank.row_norms()[masked], torch.zeros(int(masked.sum())))  # exactly zero
    wrapped_correct, wrapped_logits = _accuracy(session.model, val)
    small, report = session.finalize()
    correct, logits = _accuracy(small, val)
    assert correct == wrapped_correct and wrapped_correct / len(splits.test_labels) > 0.9
    assert float((logits - wrapped_logits).abs().max()) <= 1e-4 * float(wrapped_logits.abs().max())
    assert report.flops_ratio <= 0.471 and report.extra["masked_rows_above_threshold"] == 0
    assert report.extra["removed_rows"] == int(masked.sum())
