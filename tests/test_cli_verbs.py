"""The main-job verbs: demo, train, finalize, info; typed options; errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mslim
from mslim.cli import main
from mslim.cli.arguments import parse_options
from mslim.data import write_cifar_folder
from mslim.models import create, example_input
from mslim.training import load_training_checkpoint
from mslim_core.cost import count_cost
from mslim_core.errors import ConfigError
from tests.toy_pruner import ToyPlugin

ROOT = Path(__file__).resolve().parents[1]
HAS_RESREP = "resrep" in {a.name for a in mslim.algorithms()}
HAS_MAGNITUDE = "magnitude" in {a.name for a in mslim.algorithms()}


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mslim", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


@pytest.fixture
def toy(fresh_plugins):
    fresh_plugins.register(ToyPlugin(), name="toy-plugin")
    return fresh_plugins


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    """A tiny CIFAR-10-format folder: 40 train and 20 test images of 4 classes."""
    g = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 4
    test = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    return write_cifar_folder(root, images, labels, test_images=test, test_labels=torch.arange(20) % 4)


def test_parse_options_reads_json_scalars():
    assert parse_options(["lasso_strength=1e-4", "include-stem=true", "ignored_layers=[\"fc\"]", "mode=fast",
                          "round_to=8"]) == {"lasso_strength": 1e-4, "include_stem": True, "ignored_layers": ["fc"],
                                             "mode": "fast", "round_to": 8}
    with pytest.raises(ConfigError, match="--option takes key=value .* got 'oops'"):
        parse_options(["oops"])


def test_info_zoo_model_table_and_totals(capsys):
    assert main(["info", "resnet20"]) == 0
    out = capsys.readouterr().out
    cost = count_cost(create("resnet20"), example_input("resnet20"))
    assert "layer3.2.conv2" in out and "BatchNorm2d" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert f"{cost.macs:,}" in total and f"{cost.params:,}" in total
    assert main(["info", "resnet20", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["macs"] == cost.macs and sum(r["params"] for r in data["layers"]) == cost.params
    conv = next(r for r in data["layers"] if r["name"] == "layer2.0.conv1")
    assert (conv["in_channels"], conv["out_channels"], conv["macs"]) == (16, 32, 16 * 32 * 9 * 16 * 16)


def test_errors_print_one_line_without_traceback(tmp_path, capsys):
    result = run_cli("info", "resnet21")  # one real process: the message, exit status 2, no traceback
    assert result.returncode == 2
    assert result.stderr.startswith("mslim: error: 'resnet21' is neither a file nor a zoo model; zoo models: ")
    assert "Traceback" not in result.stderr
    cases = [
        (["train", "--algo", "nope", "--out", str(tmp_path / "a")], "unknown algorithm 'nope'"),
        (["train", "--algo", "magnitude", "--data", f"cifar10:{tmp_path / 'none'}", "--out", str(tmp_path / "b")],
         "cifar10: no such folder"),
        (["finalize", "--wrapped-model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.mslim")],
         "no training checkpoint at"),
        (["train", "--algo", "magnitude", "--resume"], "--resume needs --out"),
        (["train", "--algo", "magnitude", "--option", "flops_target=0.3", "--flops-target", "0.5"],
         "flops_target is given twice"),
        (["train", "--algo", "magnitude", "--device", "gpu0", "--out", str(tmp_path / "c")],
         "device 'gpu0' is not a device torch knows"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"mslim: error: {message}"), err
    for args, message in [
        (["train", "--algo", "resrep", "--epochs", "two"], "argument --epochs: expected an integer >= 0, got 'two'"),
        (["train", "--algo", "resrep", "--flops-target", "1.5"], "argument --flops-target: expected a number in (0, 1]"),
        (["train", "--algo", "resrep", "--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_train_toy_on_a_cifar_folder_then_info_and_resume(toy, cifar_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--algo", "toy", "--model", "resnet20", "--data", f"cifar10:{cifar_folder}", "--epochs", "1",
            "--base-epochs", "1", "--batch-size", "16", "--option", "scale=0.5", "--no-latency", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "MACs" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["options"] == {"scale": 0.5} and report["spec"]["data"] == f"cifar10:{cifar_folder}"
    assert report["prune_report"]["extra"]["steps_seen"] == 3  # 40 images / 16 per batch
    assert report["base"]["macs"] == count_cost(create("resnet20"), example_input("resnet20")).macs  # CIFAR-10: 10
    assert (out / "layer_widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = load_training_checkpoint(out / "prune" / "last.pt")
    assert ckpt["extra"]["meta"] == {"model": "resnet20", "num_classes": 10, "in_channels": 3,
                                     "input_shape": [3, 32, 32], "data": f"cifar10:{cifar_folder}", "seed": 0,
                                     "phase": "prune", "algorithm": "toy"}
    assert ckpt["session"]["config"]["scale"] == 0.5

    # a finished run is not silently overwritten; --resume re-measures it from its checkpoints
    assert main(args) == 2
    assert "already holds a finished run (report.json); choose another --out folder" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    capsys.readouterr()

    assert main(["info", str(out / "base" / "last.pt")]) == 0
    assert "resnet20 (trained 1 epochs)" in capsys.readouterr().out
    assert main(["info", str(out / "pruned.mslim")]) == 0
    text = capsys.readouterr().out
    assert "resnet20 pruned by toy (pruned.mslim)" in text and "layer3.2.conv2" in text


@pytest.mark.skipif(not HAS_MAGNITUDE, reason="magnitude plugin not available")
def test_train_one_shot_algorithm_fine_tunes(cifar_folder, tmp_path, capsys):
    out = tmp_path / "mag"
    assert main(["train", "--algo", "magnitude", "--model", "resnet20", "--data", f"cifar10:{cifar_folder}",
                 "--flops-target", "0.5", "--epochs", "1", "--base-epochs", "1", "--batch-size", "20",
                 "--no-latency", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["flops_ratio"] <= 0.51
    assert report["accuracy_before_finetune"] is not None and (out / "finetune" / "last.pt").exists()
    model = mslim.load(out / "pruned.mslim", model=create("resnet20"))
    assert count_cost(model, example_input("resnet20")).macs == report["pruned"]["macs"]


@pytest.mark.skipif(not HAS_RESREP, reason="resrep plugin not available")
def test_demo_fast_setting_writes_report_model_and_chart(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--epochs", "2", "--base-epochs", "1", "--image-size", "8", "--out", str(out),
                     "--no-progress", timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "latency, batch 64" in result.stdout and "parameters" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["algo"] == "resrep" and report["spec"]["flops_target"] == 0.471
    assert set(report["base"]["latency_ms"]) == {"1", "64"}
    assert report["hardware"]["threads"] == 2
    assert (out / "layer_widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = mslim.load(out / "pruned.mslim", model=create("resnet20", num_classes=10, in_channels=1))
    assert count_cost(model, torch.zeros(1, 1, 8, 8)).macs == report["pruned"]["macs"]

    # the trained wrapped checkpoint finalizes again from the command line, to the same model
    final = tmp_path / "again.mslim"
    again = run_cli("finalize", "--wrapped-model", str(out / "prune" / "last.pt"), "--threshold", "1e-5",
                    "--out", str(final))
    assert again.returncode == 0, again.stderr[-2000:]
    rebuilt = mslim.load(final, model=create("resnet20", num_classes=10, in_channels=1))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), model.eval()(x), atol=1e-5)


def test_finalize_refuses_plain_training_checkpoint(toy, cifar_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--algo", "toy", "--data", f"cifar10:{cifar_folder}", "--epochs", "1", "--base-epochs",
                 "1", "--batch-size", "20", "--no-latency", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    code = main(["finalize", "--wrapped-model", str(out / "base" / "last.pt"), "--out", str(tmp_path / "f.mslim")])
    assert code == 2
    assert "holds plain training (no pruning session): nothing to finalize" in capsys.readouterr().err


@pytest.mark.parametrize("setting, flags, seen_key, expected, note", [
    ({"channels_last": True}, ["--channels-last"], "channels_last", True, "2 threads, channels-last, BatchNorm folded"),
    ({"latency_runtime": "onnxruntime"}, ["--latency-runtime", "onnxruntime"], "runtime", "onnxruntime",
     "2 threads, in ONNX Runtime, BatchNorm folded"),
], ids=["channels-last", "onnxruntime"])
def test_latency_settings_reach_the_timer_the_cli_and_the_summary(monkeypatch, setting, flags, seen_key, expected,
                                                                   note):
    import mslim.latency
    from mslim import pipeline
    from mslim.cli.demo import demo_spec
    from mslim.cli.main import build_parser
    from mslim.cli.summary import format_comparison
    from mslim_core.report import PruneReport

    seen: list[object] = []
    real = mslim.latency.measure_latency

    def spy(*args, **kwargs):
        seen.append(kwargs[seen_key])
        return real(*args, **{**kwargs, "min_runs": 1, "min_seconds": 0.0, "warmup": 0})

    monkeypatch.setattr(mslim.latency, "measure_latency", spy)
    spec = pipeline.RunSpec(algo="magnitude", latency_batches=(1, 2), **setting)
    times = pipeline._latency(create("resnet20", in_channels=1), torch.randn(2, 1, 8, 8), spec)
    assert seen == [expected] and set(times) == {1, 2} and all(t > 0 for t in times.values())

    parser = build_parser()
    (field,) = setting
    assert getattr(parser.parse_args(["train", "--algo", "magnitude", *flags]), field) == expected
    assert getattr(parser.parse_args(["demo", *flags]), field) == expected
    assert getattr(demo_spec(**setting), field) == expected
    assert getattr(parser.parse_args(["train", "--algo", "magnitude"]), field) == getattr(pipeline.RunSpec(algo="x"),
                                                                                         field)

    figures = pipeline.ModelFigures(accuracy=0.9, loss=0.3, macs=200, params=50, latency_ms={1: 2.0})
    smaller = pipeline.ModelFigures(accuracy=0.9, loss=0.3, macs=100, params=30, latency_ms={1: 1.0})
    report = PruneReport(algorithm="magnitude", macs_before=200, macs_after=100, params_before=50, params_after=30)
    result = pipeline.RunResult(spec=spec, out_dir=Path("."), base=figures, pruned=smaller, report=report,
                                trains=False)
    assert note in format_comparison(result)
    result.spec = pipeline.RunSpec(algo="magnitude")
    assert "2 threads, BatchNorm folded" in format_comparison(result)


def test_an_unknown_latency_runtime_is_refused_by_the_cli():
    from mslim.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--latency-runtime", "tvm"])


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_a_slower_pruned_model_is_called_slower(runtime):
    from mslim import pipeline
    from mslim.cli.summary import format_comparison
    from mslim_core.report import PruneReport

    base = pipeline.ModelFigures(accuracy=0.9, loss=0.3, macs=200, params=50, latency_ms={1: 1.0, 64: 8.0})
    small = pipeline.ModelFigures(accuracy=0.9, loss=0.3, macs=100, params=30, latency_ms={1: 1.25, 64: 4.0})
    report = PruneReport(algorithm="resrep", macs_before=200, macs_after=100, params_before=50, params_after=30)
    result = pipeline.RunResult(spec=pipeline.RunSpec(algo="resrep", latency_runtime=runtime), out_dir=Path("."),
                                base=base, pruned=small, report=report, trains=True)
    text = format_comparison(result)
    assert "1.25x slower" in text and "2.00x faster" in text
    from mslim.latency import channel_block

    block = channel_block()
    hint = f"not multiples of {block} on this CPU: prune with round_to={block}"
    assert (hint in text) == (runtime == "onnxruntime")
    small.latency_ms = {1: 0.5, 64: 4.0}
    assert hint not in format_comparison(result)
