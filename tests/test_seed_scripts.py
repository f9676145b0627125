"""The seed's three ResNet-56 / CIFAR-10 scripts, run as subprocesses on a tiny folder in CIFAR-10's format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mslim
from mslim.algorithms.pytorch.prune.Resrep_pruner import ResRep
from mslim.data import write_cifar_folder
from mslim.models import create
from mslim_core.io import file_kind, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "resnet56_cifar10"


def _run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 random images in the python-pickle layout (the test batch repeats the training batches)."""
    root = tmp_path_factory.mktemp("cifar")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    write_cifar_folder(root / "cifar-10-batches-py", images, labels)
    return root


TRAIN = ("--epochs", "3", "--batch_size", "16", "--flops_target", "0.471", "--lasso_strength", "1e-4")


def test_three_steps_of_the_seed_document(cifar: Path, tmp_path: Path) -> None:
    # step 1: the base model, in the safe format (not a pickled module)
    _run("train_base.py", "--data", str(cifar), "--epochs", "1", "--batch_size", "16", cwd=tmp_path)
    assert file_kind(tmp_path / "best_pretrained.pt") == "mslim"
    base = mslim.load(tmp_path / "best_pretrained.pt", model=lambda: create("resnet56"))

    # step 2: ResRep training; 4 iterations per epoch, so the planned ramp masks and zeroes within 12
    log = _run("Resrep_train.py", "--data", str(cifar), "--pretrained", "best_pretrained.pt", *TRAIN, cwd=tmp_path)
    assert "masked rows" in log and "done: 12 of 12 iterations" in log
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    assert state["format"] == "mslim.checkpoint" and state["session"]["algorithm"] == "resrep"
    assert state["extra"]["target_reached"] and state["session"]["config"]["flops_target"] == 0.471
    masked_at = state["session"]["pruner"]["masked_at"]
    assert int((masked_at >= 0).sum()) > 0
    # ResRep started from the base weights: its stem (never compacted) is nearer to them than to the init
    torch.manual_seed(0)
    init = create("resnet56").conv1.weight
    stem = state["model"]["conv1.weight"]
    assert (stem - base.conv1.weight).norm() < 0.5 * (stem - init).norm()

    # step 3: fold, remove, report, save
    log = _run("Resrep_prune.py", "--wrapped_model", "best.pt", "--threshold", "1e-5", "--out", "pruned.mslim",
               cwd=tmp_path)
    assert "MACs" in log and "pruned model written to pruned.mslim" in log
    assert file_kind(tmp_path / "pruned.mslim") == "mslim"
    pruned = mslim.load(tmp_path / "pruned.mslim", model=lambda: create("resnet56"))
    report = read_manifest(tmp_path / "pruned.mslim")["report"]
    assert report["macs_after"] <= 0.471 * report["macs_before"]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())

    # the pruned model computes what the trained wrapped model computes
    example = torch.randn(1, 3, 32, 32)
    wrapped = ResRep(create("resnet56"), example_inputs=example, **state["session"]["config"]).wrapped_model
    wrapped.load_state_dict(state["model"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want, got = wrapped.eval()(x), pruned.eval()(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_interrupted_run_resumes_to_the_same_checkpoint(cifar: Path, tmp_path: Path) -> None:
    args = ("--data", str(cifar), "--pretrained", "", *TRAIN)
    _run("Resrep_train.py", *args, "--out", "full", cwd=tmp_path)
    log = _run("Resrep_train.py", *args, "--out", "split", "--epochs_this_run", "1", cwd=tmp_path)
    assert "done: 4 of 12 iterations; 8 left" in log
    log = _run("Resrep_train.py", *args, "--out", "split", "--resume", cwd=tmp_path)
    assert "resumed from split/last.pt: epoch 1, iteration 4" in log
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert torch.equal(full["session"]["pruner"]["masked_at"], split["session"]["pruner"]["masked_at"])
    assert full["session"]["iteration"] == split["session"]["iteration"] == 11
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
