"""Fine-tuning after pruning: RunSpec.finetune_epochs (training and one-shot algorithms), kill and resume
during fine-tuning, mslim.prune(finetune_epochs=...), the --finetune-epochs flag and the summary."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

import mslim
from mslim import pipeline
from mslim.cli.main import build_parser
from mslim.cli.summary import format_comparison
from mslim.data import TensorLoader
from mslim.pipeline import RunSpec, run
from mslim.training import evaluate, load_training_checkpoint
from mslim_core.errors import ConfigError

ALGOS = {a.name for a in mslim.algorithms()}
needs_slimming = pytest.mark.skipif("slimming" not in ALGOS, reason="slimming plugin not available")
needs_magnitude = pytest.mark.skipif("magnitude" not in ALGOS, reason="magnitude plugin not available")


class _Stop(Exception):
    """Raised from a trainer callback right after a checkpoint: a simulated kill."""


def _spec(**changes) -> RunSpec:
    """Slimming on 8x8 digits, untrained base, 1 epoch of sparse training and 2 of fine-tuning."""
    settings = {"algo": "slimming", "model": "resnet20", "data": "digits", "image_size": 8, "flops_target": 0.6,
                "epochs": 1, "finetune_epochs": 2, "base_epochs": 0, "lr": 0.05, "batch_size": 128,
                "options": {"sparsity": 1e-3}, "measure_latency": False, "progress": False, "device": "cpu"}
    settings.update(changes)
    return RunSpec(**settings)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> pipeline.RunResult:
    """One uninterrupted slimming run with fine-tuning (shared by the tests that only read it)."""
    return run(_spec(), tmp_path_factory.mktemp("full") / "run", log=lambda text: None)


@needs_slimming
def test_training_algorithm_is_fine_tuned_after_finalize(full_run):
    result = full_run
    assert set(result.history) == {"prune", "finetune"}
    assert [h["epoch"] for h in result.history["finetune"]] == [1, 2]
    assert result.accuracy_before_finalize is not None and result.accuracy_before_finetune is not None
    # fine-tuning trains the finalized model: its last epoch's accuracy is the reported one
    assert result.history["finetune"][-1]["val_accuracy"] == pytest.approx(result.pruned.accuracy)
    assert result.flops_ratio <= 0.6 + 1e-9
    report = json.loads((result.out_dir / "report.json").read_text())
    assert report["spec"]["finetune_epochs"] == 2
    assert report["accuracy_before_finetune"] == pytest.approx(result.accuracy_before_finetune)
    # the finalize change compares the finalized model (before fine-tuning) with the trained session model
    assert report["finalize_accuracy_change_points"] == pytest.approx(
        100 * (result.accuracy_before_finetune - result.accuracy_before_finalize))
    ckpt = load_training_checkpoint(result.out_dir / "finetune" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["extra"]["meta"]["phase"] == "finetune"
    assert ckpt["extra"]["meta"]["algorithm"] == "slimming"
    text = format_comparison(result)
    assert "before finalize" in text
    assert f"accuracy right after finalize, before fine-tuning: {100 * result.accuracy_before_finetune:.2f}%" in text


@needs_slimming
def test_kill_during_fine_tuning_and_resume_gives_the_same_model(full_run, tmp_path, monkeypatch):
    real_fit = pipeline.fit

    def killing_fit(*args, **kwargs):
        if kwargs.get("desc") == "fine-tune":
            def stop(record):
                if record["epoch"] == 1:
                    raise _Stop
            kwargs["callbacks"] = [stop]
        return real_fit(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(pipeline, "fit", killing_fit)
    with pytest.raises(_Stop):
        run(_spec(), out, log=lambda text: None)
    monkeypatch.setattr(pipeline, "fit", real_fit)
    assert load_training_checkpoint(out / "finetune" / "last.pt")["epoch"] == 1
    assert not (out / "report.json").exists()
    torch.rand(100)  # the process moves on: the resumed run must not depend on this

    resumed = run(_spec(), out, resume=True, log=lambda text: None)
    assert load_training_checkpoint(out / "finetune" / "last.pt")["epoch"] == 2
    want, got = full_run.model.state_dict(), resumed.model.state_dict()
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert resumed.accuracy_before_finetune == full_run.accuracy_before_finetune
    assert resumed.pruned.accuracy == full_run.pruned.accuracy
    assert [h["val_accuracy"] for h in resumed.history["finetune"]] == [
        h["val_accuracy"] for h in full_run.history["finetune"]]


@needs_magnitude
def test_one_shot_default_and_explicit_finetune_epochs(tmp_path):
    assert _spec(finetune_epochs=None).finetune_epochs_for(trains=True) == 0
    assert _spec(finetune_epochs=None, epochs=3).finetune_epochs_for(trains=False) == 3
    assert _spec(finetune_epochs=1, epochs=3).finetune_epochs_for(trains=False) == 1
    result = run(_spec(algo="magnitude", options={}, epochs=5, finetune_epochs=0), tmp_path / "mag",
                 log=lambda text: None)
    assert "finetune" not in result.history and not (tmp_path / "mag" / "finetune").exists()
    assert result.accuracy_before_finetune == pytest.approx(result.pruned.accuracy)  # nothing changed it


@needs_slimming
def test_training_algorithm_without_finetune_keeps_todays_report(tmp_path):
    result = run(_spec(finetune_epochs=None), tmp_path / "run", log=lambda text: None)
    assert set(result.history) == {"prune"} and result.accuracy_before_finetune is None
    assert result.finalize_change_points == pytest.approx(
        100 * (result.pruned.accuracy - result.accuracy_before_finalize))
    assert "before fine-tuning" not in format_comparison(result)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_finetune_epochs_is_a_config_error(value, tmp_path):
    with pytest.raises(ConfigError, match=rf"finetune_epochs must be an integer >= 0 .* got {value!r}"):
        run(_spec(finetune_epochs=value), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _tiny_loaders() -> tuple[TensorLoader, TensorLoader]:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (48,), generator=g)
    return TensorLoader(images, labels, 16, seed=1), TensorLoader(images[:16], labels[:16], 16, shuffle=False)


@needs_slimming
def test_prune_finetune_epochs_trains_the_finalized_model(tmp_path):
    train, val = _tiny_loaders()
    x = torch.randn(2, 3, 8, 8)
    kwargs = {"algo": "slimming", "example_inputs": x, "train_loader": train, "val_loader": val, "epochs": 1,
              "flops_target": 0.6, "sparsity": 1e-3}
    plain, _ = mslim.prune(_tiny_model(), train_options={"lr": 0.05, "progress": False}, **kwargs)
    tuned, report = mslim.prune(_tiny_model(), finetune_epochs=1,
                                train_options={"lr": 0.05, "progress": False, "out_dir": tmp_path}, **kwargs)
    assert report.macs_after <= 0.6 * report.macs_before
    want, got = plain.state_dict(), tuned.state_dict()
    assert {k: v.shape for k, v in want.items()} == {k: v.shape for k, v in got.items()}  # same architecture
    changed = [k for k in want if want[k].is_floating_point() and not torch.allclose(want[k], got[k])]
    assert "0.weight" in changed and "8.weight" in changed
    assert tuned(x).shape == (2, 4)
    # the session's training and the fine-tuning write separate checkpoints
    assert load_training_checkpoint(tmp_path / "last.pt")["session"]["algorithm"] == "slimming"
    assert load_training_checkpoint(tmp_path / "finetune" / "last.pt")["session"]["algorithm"] is None
    assert evaluate(tuned, val)[0] == pytest.approx(
        load_training_checkpoint(tmp_path / "finetune" / "last.pt")["extra"]["history"][-1]["val_accuracy"])


@needs_magnitude
def test_prune_finetune_epochs_after_one_shot():
    train, _ = _tiny_loaders()
    x = torch.randn(2, 3, 8, 8)
    pruned, _ = mslim.prune(_tiny_model(), algo="magnitude", example_inputs=x, flops_target=0.6)
    tuned, _ = mslim.prune(_tiny_model(), algo="magnitude", example_inputs=x, flops_target=0.6, train_loader=train,
                           finetune_epochs=1, train_options={"lr": 0.05, "progress": False})
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in tuned.state_dict().items()}
    assert not torch.allclose(pruned.state_dict()["0.weight"], tuned.state_dict()["0.weight"])


def test_prune_finetune_errors():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="finetune_epochs=2 fine-tunes the pruned model on train_loader, but no "
                                          "train_loader was given"):
        mslim.prune(_tiny_model(), algo="magnitude", example_inputs=x, finetune_epochs=2)
    for value in (-1, 0.5, False):
        with pytest.raises(ConfigError, match=rf"finetune_epochs must be an integer >= 0 .* got {value!r}"):
            mslim.prune(_tiny_model(), algo="magnitude", example_inputs=x, finetune_epochs=value)


def _train_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--algo", "slimming", *extra])


def test_cli_flag_parses_and_reaches_the_spec(monkeypatch, capsys):
    assert _train_args().finetune_epochs is None
    assert _train_args("--finetune-epochs", "7").finetune_epochs == 7
    assert _train_args("--finetune-epochs", "0").finetune_epochs == 0
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(SystemExit) as stop:
            _train_args("--finetune-epochs", bad)
        assert stop.value.code == 2
        assert f"argument --finetune-epochs: expected an integer >= 0, got '{bad}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--finetune-epochs N" in help_text
    assert "(default: 0 for training algorithms, --epochs for one-shot ones)" in help_text

    seen: list[RunSpec] = []

    class _Done(Exception):
        pass

    def fake_run(spec, out, resume=False):
        seen.append(spec)
        raise _Done

    import mslim.cli.train as train_verb

    monkeypatch.setattr(train_verb, "run", fake_run)
    with pytest.raises(_Done):
        train_verb.run_train(_train_args("--finetune-epochs", "3", "--out", "unused"))
    assert seen[0].finetune_epochs == 3
