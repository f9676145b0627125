"""The trainer: hooks order, cosine LR, metrics, checkpoints, exact resume, NaN reports, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mslim
from mslim.data import TensorLoader, crop_and_flip
from mslim.training import PlainSession, cosine_factor, evaluate, fit, load_training_checkpoint
from mslim_core.errors import CheckpointError, ConfigError, MslimWarning, TrainingError
from tests.toy_pruner import ToyPlugin

ROOT = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    """Raised from a callback to stop a run right after a checkpoint (a simulated kill)."""


def _model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )


def _loaders(n: int = 48, batch: int = 8, augment: bool = True) -> tuple[TensorLoader, TensorLoader]:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    train = TensorLoader(images, labels, batch, augment=crop_and_flip(2) if augment else None, seed=3)
    val = TensorLoader(images[:20], labels[:20], 16, shuffle=False)
    return train, val


@pytest.fixture
def toy(fresh_plugins):
    fresh_plugins.register(ToyPlugin(), name="toy-plugin")
    return fresh_plugins


def _session(seed: int = 1, **options):
    return mslim.prepare(_model(seed), algo="toy", example_inputs=torch.randn(2, 3, 8, 8), **options)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fit_drives_the_session_and_logs(toy, tmp_path):
    session = _session()
    train, val = _loaders()
    result = fit(session, train, val, epochs=2, lr=0.05, out_dir=tmp_path, log_every=2, progress=False,
                 meta={"model": "toy-cnn"})
    per_epoch = len(train)
    assert session.iteration == 2 * per_epoch == result.iterations
    assert session.pruner.steps_seen == 2 * per_epoch
    lines = _lines(tmp_path / "metrics.jsonl")
    epochs = [r for r in lines if r["kind"] == "epoch"]
    steps = [r for r in lines if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["iteration"] for r in steps] == list(range(2, 2 * per_epoch + 1, 2))
    assert {"train_loss", "train_accuracy", "val_accuracy", "val_loss", "lr", "steps"} <= set(epochs[-1])
    assert epochs[-1]["steps"] == 2 * per_epoch  # the session's progress() figures are logged
    # the lr of the last step follows the cosine to 0 over all iterations
    assert epochs[-1]["lr"] == pytest.approx(0.05 * cosine_factor(2 * per_epoch - 1, 2 * per_epoch))
    acc, loss = evaluate(session.model, val)
    assert epochs[-1]["val_accuracy"] == pytest.approx(acc) and epochs[-1]["val_loss"] == pytest.approx(loss)
    assert result.val_accuracy == pytest.approx(acc)

    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 2 * per_epoch
    assert ckpt["session"]["algorithm"] == "toy" and ckpt["session"]["pruner"] == {"steps_seen": 2 * per_epoch}
    assert ckpt["extra"]["meta"] == {"model": "toy-cnn", "input_shape": [3, 8, 8]}
    assert ckpt["extra"]["loader"] == {"epoch": 2, "seed": 3}
    assert ckpt["extra"]["schedule"]["iters_per_epoch"] == per_epoch
    assert [h["epoch"] for h in ckpt["extra"]["history"]] == [1, 2]
    assert set(ckpt["model"]) == set(session.model.state_dict())
    assert len(ckpt["extra"]["rank_rng"]) == 1 and "torch" in ckpt["rng"]
    assert load_training_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_fit_tells_the_pruner_the_run_length_before_the_first_step(toy):
    train, val = _loaders(n=48, batch=8)
    session = _session()
    assert session.pruner.planned is None
    fit(session, train, val, epochs=2, lr=0.01, progress=False)
    assert session.pruner.planned == (2 * 6, 6)  # 48 images / batch 8 = 6 iterations per epoch


def test_the_base_pruner_ignores_plan(toy):
    from mslim_core import Pruner

    session = _session()
    Pruner.plan(session.pruner, 100, 10)  # the default: a no-op for algorithms without a schedule
    assert session.pruner.planned is None


def test_cosine_factor_values():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(3, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_after_backward_runs_before_the_optimizer_step(toy):
    train, _ = _loaders(augment=False)
    before = _model().state_dict()
    tiny = _session(scale=1e-12)
    fit(tiny, train, epochs=1, lr=0.1, weight_decay=0.0, progress=False)
    normal = _session(scale=1.0)
    fit(normal, train, epochs=1, lr=0.1, weight_decay=0.0, progress=False)
    w = "0.weight"
    assert torch.allclose(tiny.model.state_dict()[w], before[w], atol=1e-9)
    assert (normal.model.state_dict()[w] - before[w]).abs().max() > 1e-3


def test_kill_and_resume_gives_the_same_weights(toy, tmp_path):
    train, val = _loaders()
    full = _session()
    fit(full, train, val, epochs=3, lr=0.05, out_dir=tmp_path / "full", log_every=1, progress=False)

    def stop(record):
        if record["epoch"] == 1:
            raise _Stop

    killed = _session()
    train_b, val_b = _loaders()
    with pytest.raises(_Stop):
        fit(killed, train_b, val_b, epochs=3, lr=0.05, out_dir=tmp_path / "b", log_every=1, progress=False,
            callbacks=[stop])
    assert load_training_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    torch.rand(100)  # the process moves on: the resumed run must not depend on this

    resumed = _session(seed=7)  # other initial weights: all of them come from the checkpoint
    train_c, val_c = _loaders()
    result = fit(resumed, train_c, val_c, epochs=3, lr=0.05, out_dir=tmp_path / "b", resume=True, log_every=1,
                 progress=False)
    assert result.resumed_from_epoch == 1
    want, got = full.model.state_dict(), resumed.model.state_dict()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert resumed.iteration == full.iteration and resumed.pruner.steps_seen == full.pruner.steps_seen

    def strip(lines):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in lines]

    assert strip(_lines(tmp_path / "b" / "metrics.jsonl")) == strip(_lines(tmp_path / "full" / "metrics.jsonl"))


def test_resume_of_a_partial_line_and_a_finished_run(toy, tmp_path):
    train, _ = _loaders(augment=False)
    fit(_session(), train, epochs=1, out_dir=tmp_path, log_every=1, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "step", "iteration": 99')  # a write cut by a crash
    again = _session()
    result = fit(again, train, epochs=1, out_dir=tmp_path, resume=True, progress=False)
    assert result.iterations == len(train) and again.iteration == len(train)
    assert all(r["iteration"] <= len(train) for r in _lines(tmp_path / "metrics.jsonl"))


def test_checkpoint_misuse_errors(toy, tmp_path):
    train, _ = _loaders(augment=False)
    with pytest.raises(CheckpointError, match="no training checkpoint at .*last.pt"):
        fit(_session(), train, epochs=1, out_dir=tmp_path, resume=True, progress=False)
    fit(_session(), train, epochs=1, out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="already exists: pass resume=True"):
        fit(_session(), train, epochs=1, out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"epochs 1 -> 2"):
        fit(_session(), train, epochs=2, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="toy"):
        fit(nn.Sequential(_model()), train, epochs=1, out_dir=tmp_path, resume=True, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(CheckpointError, match="last.pt"):
        load_training_checkpoint(tmp_path / "bad" / "last.pt")


def test_bad_settings_are_named(toy):
    train, _ = _loaders(augment=False)
    with pytest.raises(TrainingError, match="epochs must be a positive integer, got 0"):
        fit(_session(), train, epochs=0)
    with pytest.raises(TrainingError, match="lr must be a positive number, got -1"):
        fit(_session(), train, epochs=1, lr=-1)
    with pytest.raises(TrainingError, match="PruningSession .* or an nn.Module, got str"):
        fit("model", train, epochs=1)


def test_nan_gradient_names_layer_and_iteration(toy):
    session = _session()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 3 else grad

    session.model[6].weight.register_hook(poison)
    train, _ = _loaders(augment=False)
    with pytest.raises(TrainingError, match=r"non-finite gradient at iteration 2 \(epoch 1, batch 2\): the first "
                                            r"layer with a NaN/inf gradient is '6' \(parameter '6.weight'\)"):
        fit(session, train, epochs=1, progress=False)


def test_nan_loss_is_reported(toy):
    session = _session()
    train, _ = _loaders(augment=False)
    with torch.no_grad():
        session.model[6].bias.fill_(float("inf"))
    with pytest.raises(TrainingError, match=r"at iteration 0 \(epoch 1, batch 0\).*the loss was nan"):
        fit(session, train, epochs=1, progress=False)


def test_plain_model_training_and_evaluate_by_hand():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.tensor([[2.0, 0.0], [0.0, 2.0]]).repeat(x.shape[0] // 2, 1) + self.w

    images = torch.zeros(4, 1, 2, 2)
    labels = torch.tensor([0, 0, 1, 0])  # predictions are 0, 1, 0, 1: only sample 0 is right
    loader = TensorLoader(images, labels, 2, shuffle=False)
    acc, loss = evaluate(Fixed(), loader)
    assert acc == pytest.approx(0.25)
    right = -math.log(math.exp(2) / (math.exp(2) + 1))
    wrong = -math.log(1 / (math.exp(2) + 1))
    assert loss == pytest.approx((right + 3 * wrong) / 4, rel=1e-6)


def test_plain_model_fit():
    train, val = _loaders(augment=False)
    model = _model()
    result = fit(model, train, val, epochs=2, lr=0.05, progress=False)
    assert result.iterations == 2 * len(train) and len(result.history) == 2
    assert PlainSession(model).state_dict()["algorithm"] is None


def test_prune_one_liner_trains_through_fit(toy, tmp_path):
    train, val = _loaders(augment=False)
    model, report = mslim.prune(_model(), algo="toy", example_inputs=torch.randn(2, 3, 8, 8), train_loader=train,
                                val_loader=val, epochs=2, train_options={"lr": 0.02, "progress": False,
                                                                         "out_dir": tmp_path})
    assert report.extra["steps_seen"] == 2 * len(train)
    assert (tmp_path / "last.pt").exists()
    with pytest.raises(ConfigError, match="prunes while training: pass train_loader= and epochs="):
        mslim.prune(_model(), algo="toy", example_inputs=torch.randn(2, 3, 8, 8))


_DDP_SCRIPT = """
import json, os, sys, torch
from torch import nn
sys.path[:0] = [{root!r}, {plugins!r}]
from mslim import distributed
from mslim.data import TensorLoader
from mslim.training import fit, evaluate
torch.set_num_threads(1)
distributed.init_from_env()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3))
g = torch.Generator().manual_seed(1)
x = torch.randint(0, 256, (33, 3, 6, 6), dtype=torch.uint8, generator=g)
y = torch.randint(0, 3, (33,), generator=g)
train = TensorLoader(x, y, 4, seed=2)
val = TensorLoader(x[:11], y[:11], 4, shuffle=False)
out = sys.argv[1]
result = fit(model, train, val, epochs=2, lr=0.05, out_dir=out, progress=False)
acc, _ = evaluate(model, val)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
rank = distributed.rank()
pruned = []
import mslim
if "taylor" in {{a.name for a in mslim.algorithms()}}:  # channels removed while training: DDP is rebuilt
    from mslim.training import planned_options
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    train2 = TensorLoader(x, y, 4, seed=2)
    opts = planned_options("taylor", None, {{"flops_target": 0.6}}, train2, 2)
    session = mslim.prepare(net, algo="taylor", example_inputs=torch.randn(2, 3, 6, 6), **opts)
    fit(session, train2, epochs=2, lr=0.05, progress=False)
    pruned = torch.cat([p.detach().flatten() for p in session.model.parameters()]).tolist()
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"batches": len(train), "weights": flat.tolist(), "acc": acc, "val": result.val_accuracy,
               "pruned": pruned}}, f)
distributed.destroy()
"""


def test_ddp_under_torchrun_two_processes(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_SCRIPT.format(root=str(ROOT), plugins=str(ROOT / "plugins")))
    out = tmp_path / "run"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["batches"] == r1["batches"] == math.ceil((33 // 2) / 4)  # sharded: 16 samples per rank
    assert r0["weights"] == r1["weights"]  # DDP kept the replicas identical
    assert r0["pruned"] == r1["pruned"]  # also across taylor's channel removals (when the plugin is there)
    assert r0["acc"] == r1["acc"] == r0["val"]  # evaluation summed over both shards
    lines = _lines(out / "metrics.jsonl")
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [1, 2]  # written once, by rank 0
    ckpt = load_training_checkpoint(out / "last.pt")
    assert ckpt["extra"]["schedule"]["world_size"] == 2 and len(ckpt["extra"]["rank_rng"]) == 2


HAS_RESREP = "resrep" in {a.name for a in mslim.algorithms()}


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def _resrep_session(train, epochs: int, seed: int = 0):
    from mslim.training import planned_options

    options = planned_options("resrep", None, {"flops_target": 0.5}, train, epochs)
    assert options["total_iters"] == epochs * len(train)
    return mslim.prepare(_convnet(seed), algo="resrep", example_inputs=torch.randn(2, 3, 8, 8), **options)


@pytest.mark.skipif(not HAS_RESREP, reason="resrep plugin not available")
def test_fit_drives_resrep_to_its_target_and_resumes_exactly(tmp_path):
    train, val = _loaders(n=64)
    full = _resrep_session(train, 4)
    fit(full, train, val, epochs=4, lr=0.05, out_dir=tmp_path / "full", progress=False)
    assert full.progress()["flops_ratio"] <= 0.5
    records = _lines(tmp_path / "full" / "metrics.jsonl")
    assert records[-1]["flops_ratio"] == pytest.approx(full.progress()["flops_ratio"])

    def stop(record):
        if record["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        fit(_resrep_session(train, 4), train, val, epochs=4, lr=0.05, out_dir=tmp_path / "b", progress=False,
            callbacks=[stop])
    resumed = _resrep_session(*_loaders(n=64)[:1], 4, seed=3)
    fit(resumed, _loaders(n=64)[0], val, epochs=4, lr=0.05, out_dir=tmp_path / "b", resume=True, progress=False)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert torch.equal(full.pruner.state_dict()["masked_at"], resumed.pruner.state_dict()["masked_at"])

    small, report = resumed.finalize()
    assert report.flops_ratio <= 0.5 + 1e-9
    acc_wrapped, _ = evaluate(full.model, val)
    acc_small, _ = evaluate(small, val)
    assert acc_small == acc_wrapped  # the conversion is lossless


@pytest.mark.skipif(not HAS_RESREP, reason="resrep plugin not available")
def test_prune_one_liner_with_resrep_plans_total_iters():
    train, val = _loaders(n=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MslimWarning)  # fit must find total_iters planned for this run
        small, report = mslim.prune(_convnet(), algo="resrep", example_inputs=torch.randn(2, 3, 8, 8),
                                    flops_target=0.5, train_loader=train, val_loader=val, epochs=3,
                                    train_options={"lr": 0.05, "progress": False})
    assert report.config["total_iters"] == 3 * len(train)
    assert report.flops_ratio <= 0.5 + 1e-9
    x = torch.randn(4, 3, 8, 8)
    assert small(x).shape == (4, 4)


def test_fit_warns_when_a_planned_algorithm_was_prepared_for_another_length(toy):
    class Planned(type(_session().config)):
        total_iters: int | None = None

    session = _session()
    session.pruner.config = Planned(**session.config.model_dump())
    train, _ = _loaders(augment=False)
    with pytest.warns(MslimWarning, match=rf"prepared without total_iters, but this run has {len(train)} iterations"):
        fit(session, train, epochs=1, progress=False)


_TRAINING_ALGOS = [a.name for a in mslim.algorithms() if a.trains and a.name in ("slimming", "taylor")]


@pytest.mark.parametrize("algo", _TRAINING_ALGOS)
def test_other_training_algorithms_resume_exactly_through_fit(algo, tmp_path):
    """Algorithms that change the architecture while training (taylor) or only the gradients (slimming)."""
    from mslim.training import planned_options

    train, val = _loaders(n=64)
    options = planned_options(algo, None, {"flops_target": 0.6}, train, 4)

    def session(seed: int = 0):
        return mslim.prepare(_convnet(seed), algo=algo, example_inputs=torch.randn(2, 3, 8, 8), **options)

    def stop(record):
        if record["epoch"] == 2:
            raise _Stop

    full = session()
    fit(full, train, val, epochs=4, lr=0.05, out_dir=tmp_path / "full", progress=False)
    with pytest.raises(_Stop):
        fit(session(), _loaders(n=64)[0], val, epochs=4, lr=0.05, out_dir=tmp_path / "b", progress=False,
            callbacks=[stop])
    resumed = session(seed=5)
    fit(resumed, _loaders(n=64)[0], val, epochs=4, lr=0.05, out_dir=tmp_path / "b", resume=True, progress=False)
    want, got = full.model.state_dict(), resumed.model.state_dict()
    assert list(want) == list(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small_a, report_a = full.finalize()
        small_b, report_b = resumed.finalize()
    assert report_a.macs_after == report_b.macs_after and report_a.flops_ratio <= 0.61
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(small_a.eval()(x), small_b.eval()(x))
