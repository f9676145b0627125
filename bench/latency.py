"""Latency benchmark: CPU inference time of base and pruned models, measured speed-up beside the ideal.

The ideal speed-up is the MACs ratio (base MACs / pruned MACs). Both models are timed in their deploy
form (BatchNorm folded into the convs), at batch 1 and 64 with 2 threads by default, interleaved over
several rounds (median over rounds of the best time of each round) so that load changes on the
machine hit both alike and other jobs' interference is filtered out. ``--runtime`` picks eager torch
(in each ``--memory-format``), ONNX Runtime (the exported model; needs ``mslim[deploy]``), or both.

    PYTHONPATH=.:plugins python bench/latency.py                           # zoo models pruned one-shot
    PYTHONPATH=.:plugins python bench/latency.py --zoo '' --models bench/results/models-digits  # saved models

``--zoo`` lists ``NAME@CxHxW`` entries (default: ResNet-56 and ResNet-20 at CIFAR shape, ResNet-50 at
ImageNet shape); each is pruned by ``magnitude`` to ``--flops-target`` once per ``--round-to`` multiple
and per ``--units`` choice: ``all`` prunes every independent unit including the residual-coupled stage
widths, ``internal`` only the block-internal units (the unit set ResRep prunes). Latency depends on the
shapes only, so no training is needed. With ``--models DIR`` every ``*.mslim`` file there is timed
against ``base.mslim`` of the same folder, at the input shape they were trained at or ``--models-input``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

import mslim  # noqa: E402
from mslim.latency import deploy_form, measure_latency  # noqa: E402
from mslim.models import create  # noqa: E402
from mslim.onnx_runtime import onnxruntime_model  # noqa: E402
from mslim.pipeline import hardware  # noqa: E402
from mslim_core.cost import count_cost  # noqa: E402
from mslim_core.io import read_manifest  # noqa: E402


def timed_pair(base: nn.Module, pruned: nn.Module, shape: tuple[int, ...], batches: list[int], threads: int,
               rounds: int, seconds: float, channels_last: bool = False,
               min_runs: int = 10, runtime: str = "torch") -> dict[int, tuple[float, float]]:
    """Median over ``rounds`` of each model's best latency (ms) per batch size, measured alternately.

    The best of many runs is the estimate least disturbed by other jobs on a shared machine.
    """
    example = torch.randn(1, *shape)
    a, b = deploy_form(base, example), deploy_form(pruned, example)
    if runtime == "onnxruntime":  # one session per model, built once for all rounds
        a, b = onnxruntime_model(a, example, threads), onnxruntime_model(b, example, threads)
    times: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in batches}
    for _ in range(rounds):
        for model, slot in ((a, 0), (b, 1)):
            for n, lat in measure_latency(model, shape, batches, threads=threads, min_seconds=seconds,
                                          channels_last=channels_last, min_runs=min_runs,
                                          runtime=runtime).items():
                times[n][slot].append(lat.min_ms)
    return {n: (statistics.median(x), statistics.median(y)) for n, (x, y) in times.items()}


def _zoo_original(path: Path) -> tuple[nn.Module, tuple[int, ...]]:
    manifest = read_manifest(path)
    zoo = ((manifest.get("report") or {}).get("extra") or {}).get("zoo_model")
    if not zoo:
        raise SystemExit(f"{path} does not record its zoo model (report.extra.zoo_model)")
    model = create(zoo["model"], num_classes=zoo["num_classes"], in_channels=zoo["in_channels"])
    return model, tuple(zoo["input_shape"])


def pairs_from_folder(folder: Path, shape: tuple[int, ...] | None = None
                      ) -> list[tuple[str, nn.Module, nn.Module, tuple[int, ...]]]:
    """(label, base, pruned, input shape) for every pruned model saved beside ``base.mslim``.

    ``shape`` times them at another input size than the one they were trained at (convolutional
    models with global pooling take any size; the channel counts are what pruning changed).
    """
    base_file = folder / "base.mslim"
    if not base_file.exists():
        raise SystemExit(f"{folder} has no base.mslim (run bench/accuracy.py --save-models {folder})")
    original, trained_shape = _zoo_original(base_file)
    if shape is None:
        shape = trained_shape
    elif shape[0] != trained_shape[0]:
        raise SystemExit(f"--models-input {'x'.join(map(str, shape))} has {shape[0]} channels, but the models in "
                         f"{folder} take {trained_shape[0]}")
    base = mslim.load(base_file, model=original)
    out = []
    for path in sorted(folder.glob("*.mslim")):
        if path.name == "base.mslim":
            continue
        out.append((f"{path.stem} ({folder.name})", base, mslim.load(path, model=original), shape))
    return out


def parse_zoo(text: str, default_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """``"resnet56@3x32x32,resnet50@3x224x224"`` -> [(name, shape)]; an entry without ``@`` takes ``default_shape``."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, shape = entry.partition("@")
        out.append((name, parse_shape(shape) if shape else default_shape))
    return out


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` -> (3, 32, 32)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"input shape {text!r} is not C x H x W (e.g. 3x32x32)") from None
    if len(shape) != 3 or min(shape) < 1:
        raise SystemExit(f"input shape {text!r} is not C x H x W with positive sizes (e.g. 3x32x32)")
    return shape


def pairs_one_shot(models: list[tuple[str, tuple[int, ...]]], target: float, round_to: list[int],
                   units: list[str]) -> list[tuple[str, nn.Module, nn.Module, tuple[int, ...]]]:
    """Zoo models pruned by magnitude (no training needed: latency depends on the shapes only)."""
    out = []
    for name, shape in models:
        torch.manual_seed(0)
        base = create(name, in_channels=shape[0]).eval()
        for unit_set in units:
            for multiple in round_to:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small, _ = mslim.prune(copy.deepcopy(base), algo="magnitude",
                                           example_inputs=torch.randn(2, *shape), flops_target=target,
                                           round_to=multiple, prune_coupled=unit_set == "all")
                label = f"magnitude {name}" + (", block-internal units" if unit_set == "internal" else "")
                label += f", round_to {multiple}" if multiple > 1 else ""
                out.append((label, base, small, shape))
    return out


def main(argv: list[str] | None = None) -> int:
    """Time every pair and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", action="append", default=[], help="folder of saved models (repeatable)")
    p.add_argument("--zoo", default="resnet56@3x32x32,resnet20@3x32x32,resnet50@3x224x224",
                   help="NAME@CxHxW entries to prune one-shot, comma-separated ('' for none)")
    p.add_argument("--input", default="3x32x32", help="input shape for --zoo entries without @CxHxW")
    p.add_argument("--models-input", default=None,
                   help="input shape CxHxW for --models pairs (default: the shape they were trained at)")
    p.add_argument("--flops-target", type=float, default=0.471)
    p.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16], help="channel multiples for --zoo pruning")
    p.add_argument("--units", choices=("all", "internal", "both"), default="both",
                   help="--zoo pruning: every unit, only block-internal units (ResRep's set), or both")
    p.add_argument("--runtime", choices=("torch", "onnxruntime", "both"), default="torch",
                   help="eager torch, ONNX Runtime (needs mslim[deploy]), or both")
    p.add_argument("--memory-format", choices=("contiguous", "channels_last", "both"), default="both",
                   help="memory formats of the torch runtime")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="minimum timed seconds per measurement")
    p.add_argument("--min-runs", type=int, default=10, help="minimum timed runs per measurement")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "latency.json"))
    args = p.parse_args(argv)
    units = ["all", "internal"] if args.units == "both" else [args.units]
    pairs = pairs_one_shot(parse_zoo(args.zoo, parse_shape(args.input)), args.flops_target, args.round_to, units)
    formats = ["contiguous", "channels_last"] if args.memory_format == "both" else [args.memory_format]
    runtimes = ["torch", "onnxruntime"] if args.runtime == "both" else [args.runtime]
    variants = [("torch", fmt) for fmt in formats if "torch" in runtimes]
    variants += [("onnxruntime", None)] if "onnxruntime" in runtimes else []
    for folder in args.models:
        pairs += pairs_from_folder(Path(folder), parse_shape(args.models_input) if args.models_input else None)
    rows: list[dict[str, Any]] = []
    lines = ["| model | input | runtime | batch | base (ms) | pruned (ms) | speed-up | ideal (MACs) | of ideal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, base, small, in_shape in pairs:
        x = torch.randn(1, *in_shape)
        ideal = count_cost(base, x).macs / count_cost(small, x).macs
        for runtime, fmt in variants:
            timed = timed_pair(base, small, in_shape, args.batches, args.threads, args.rounds, args.seconds,
                               channels_last=fmt == "channels_last", min_runs=args.min_runs, runtime=runtime)
            where = f"torch {fmt}" if fmt else runtime
            for batch, (t_base, t_small) in timed.items():
                speed = t_base / t_small
                rows.append({"model": label, "input": list(in_shape), "runtime": runtime, "memory_format": fmt,
                             "batch": batch, "base_ms": t_base, "pruned_ms": t_small, "speedup": speed,
                             "ideal": ideal, "of_ideal": speed / ideal})
                lines.append(f"| {label} | {'x'.join(map(str, in_shape))} | {where} | {batch} | {t_base:.3f} "
                             f"| {t_small:.3f} | {speed:.2f}x | {ideal:.2f}x | {100 * speed / ideal:.0f}% |")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    write_rows(Path(args.out), "bench/latency.py", argv, args.threads, rows)
    return 0


def write_rows(out: Path, script: str, argv: list[str] | None, threads: int, rows: list[dict[str, Any]]) -> None:
    """The JSON results file: the command that made it, the hardware and the measured rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": shlex.join(["python", script, *(argv or sys.argv[1:])]),
                               "hardware": hardware(threads), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
