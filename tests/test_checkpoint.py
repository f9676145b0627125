"""Training checkpoints: exact resume, weights_only loading, checks before changes, atomic writes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mslim
from mslim_core import CheckpointError
from mslim_core.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from tests.toy_pruner import ToyPlugin, tiny_cnn


@pytest.fixture
def toy(fresh_plugins):
    fresh_plugins.register(ToyPlugin(), name="toy-plugin")
    return fresh_plugins


X = torch.randn(2, 3, 8, 8)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    session = mslim.prepare(tiny_cnn(), algo="toy", example_inputs=X, scale=0.5)
    opt = session.optimizer(lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return session, opt, sched


def _train(session, opt, sched, steps: int) -> list[float]:
    """Steps whose data come from every RNG a resume must restore."""
    losses = []
    for _ in range(steps):
        noise = random.random() + float(np.random.rand())
        x = torch.randn(4, 3, 8, 8) + noise
        y = torch.randint(0, 4, (4,))
        loss = F.cross_entropy(session.model(x), y)
        opt.zero_grad()
        loss.backward()
        session.after_backward()
        opt.step()
        sched.step()
        session.step()
        losses.append(float(loss.detach()))
    return losses


def test_resume_continues_exactly(toy, tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    session, opt, sched = _setup()
    _train(session, opt, sched, 3)
    path = save_checkpoint(tmp_path / "ckpt.pt", session.model, opt, session, {"best_acc": 0.25},
                           epoch=1, iteration=3, scheduler=sched)
    straight = _train(session, opt, sched, 3)
    final = {k: v.clone() for k, v in session.model.state_dict().items()}

    random.seed(99)  # the resumed run must not depend on the RNG state before loading
    np.random.seed(99)
    resumed_session, resumed_opt, resumed_sched = _setup(seed=5)
    info = load_checkpoint(path, resumed_session.model, resumed_opt, resumed_session, scheduler=resumed_sched)
    assert (info.epoch, info.iteration, info.extra) == (1, 3, {"best_acc": 0.25})
    assert resumed_session.iteration == 3 and resumed_session.pruner.steps_seen == 3
    assert resumed_sched.last_epoch == 3
    assert _train(resumed_session, resumed_opt, resumed_sched, 3) == straight
    for key, value in resumed_session.model.state_dict().items():
        assert torch.equal(value, final[key]), key


def test_checkpoint_is_plain_data(toy, tmp_path: Path) -> None:
    session, opt, sched = _setup()
    _train(session, opt, sched, 1)
    path = save_checkpoint(tmp_path / "ckpt.pt", session.model, opt, session, scheduler=sched)
    state = torch.load(path, weights_only=True)
    assert state["format"] == "mslim.checkpoint" and state["format_version"] == CHECKPOINT_VERSION
    assert set(state["rng"]) >= {"torch", "python", "numpy"}


def test_checkpoint_of_another_model_changes_nothing(toy, tmp_path: Path) -> None:
    session, opt, _ = _setup()
    path = save_checkpoint(tmp_path / "ckpt.pt", session.model, opt)
    other = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.LazyLinear(4))
    other(X)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not fit the given model: .*entries missing from the file .*Resume with the same model"):
        load_checkpoint(path, other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())

    wider = tiny_cnn()
    wider[0] = nn.Conv2d(3, 8, 5, padding=2)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(e\.g\. 0\.weight \(8, 3, 3, 3\) in the file, \(8, 3, 5, 5\) in the model"):
        load_checkpoint(path, wider)


def test_optimizer_mismatch_is_found_before_the_model_changes(toy, tmp_path: Path) -> None:
    session, opt, _ = _setup()
    _train(session, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 1)
    path = save_checkpoint(tmp_path / "ckpt.pt", session.model, opt)
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = torch.optim.SGD(list(model.parameters())[:1], lr=0.1)  # one group of one tensor
    with pytest.raises(CheckpointError, match="parameter groups of sizes"):
        load_checkpoint(path, model, plain)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_interrupted_checkpoint_write_keeps_the_previous_one(toy, tmp_path: Path, monkeypatch) -> None:
    session, opt, sched = _setup()
    path = save_checkpoint(tmp_path / "ckpt.pt", session.model, opt, session, epoch=1)
    _train(session, opt, sched, 1)

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, session.model, opt, session, epoch=2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path, restore_rng=False).epoch == 1


def test_wrong_kind_of_file_and_newer_version(toy, tmp_path: Path) -> None:
    session, opt, _ = _setup()
    path = save_checkpoint(tmp_path / "ckpt.pt", session.model, opt)
    with pytest.raises(CheckpointError, match=r"is a training checkpoint, not a model file: resume with .*load_checkpoint"):
        mslim.load(path, model=tiny_cnn())
    model_file = mslim.save(tiny_cnn(), tmp_path / "m.mslim")
    with pytest.raises(CheckpointError, match="is a mslim model file, not a training checkpoint"):
        load_checkpoint(model_file)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a mslim training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    state = torch.load(path, weights_only=True)
    state["format_version"] = CHECKPOINT_VERSION + 1
    torch.save(state, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=rf"format version {CHECKPOINT_VERSION + 1} .*upgrade mslim"):
        load_checkpoint(tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="holds no session state"):
        load_checkpoint(path, session=session)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "cut.pt")
