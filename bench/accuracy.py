"""Accuracy benchmark: every algorithm (ResRep, magnitude, slimming, Taylor) and torch-pruning's GroupNormPruner.

Same base model, same FLOPs target (0.471 by default), same training budget after the base model
(``--epochs``), several seeds (mean and spread). For each method it reports the accuracy right after
pruning or ``finalize`` (no fine-tuning), after fine-tuning, the achieved FLOPs ratio and the wall time;
for training algorithms also the accuracy change caused by ``finalize`` (0 when it is lossless).

    PYTHONPATH=.:plugins python bench/accuracy.py                      # digits, ResNet-20, 3 seeds
    PYTHONPATH=.:plugins python bench/accuracy.py --data cifar10:~/data/cifar-10-batches-py \\
        --model resnet56 --base-epochs 160 --epochs 160 --image-size 0   # the paper's setting, scaled

Methods (``--methods``, comma-separated; ``all`` adds every registered algorithm):
- ``resrep``: ResRep with the plugin's short-schedule defaults (proximal zeroing, ``total_iters``);
  all ``--epochs`` are spent training through the session, then ``finalize``; no fine-tuning.
- ``resrep-plain``: the paper's plain behaviour (``zeroing="none"``), same budget.
- ``magnitude``: one-shot magnitude pruning of the base model, then ``--epochs`` of fine-tuning.
- ``tp-groupnorm``: torch-pruning's ``GroupNormPruner``: ``--epochs``/2 of sparse training, global
  pruning to the FLOPs target, then the other half of fine-tuning.
- ``slimming``: split like ``tp-groupnorm``, as the paper prunes then fine-tunes: ``--epochs``/2 of
  sparse training through its session, ``finalize``, then the other half of fine-tuning.
- ``taylor`` and any other registered algorithm: trained through its session for ``--epochs`` then
  finalized, no fine-tuning (training algorithms; taylor fine-tunes between its rounds), or pruned
  one-shot and fine-tuned, with the same budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

import mslim  # noqa: E402
from mslim.data import load_dataset, make_loaders  # noqa: E402
from mslim.models import create  # noqa: E402
from mslim.pipeline import hardware  # noqa: E402
from mslim.training import PlainSession, evaluate, fit, planned_options  # noqa: E402
from mslim_core.cost import count_cost  # noqa: E402

DEFAULT_METHODS = ("resrep", "resrep-plain", "magnitude", "tp-groupnorm", "slimming", "taylor")
SPLIT_BUDGET = frozenset({"slimming"})
"""Training algorithms that get half of ``--epochs`` through their session and half as fine-tuning."""


class GroupNormSparseSession(PlainSession):
    """Plain training plus torch-pruning's group-norm regularisation of every gradient (its sparse learning)."""

    def __init__(self, model: nn.Module, pruner: Any) -> None:
        super().__init__(model)
        self.tp_pruner = pruner

    def after_backward(self) -> None:
        """Add the group-norm penalty's gradient (torch-pruning's ``regularize``)."""
        self.tp_pruner.regularize(self.model)


def _tp_prune_to_target(model: nn.Module, pruner: Any, example: torch.Tensor, target_macs: float) -> None:
    """Step torch-pruning's iterative global pruning until the MACs are at or below the target."""
    for _ in range(pruner.iterative_steps):
        if count_cost(model, example).macs <= target_macs:
            return
        pruner.step()


def run_method(method: str, base: nn.Module, example: torch.Tensor, train: Any, val: Any, args: argparse.Namespace,
               base_macs: int, fit_kw: dict[str, Any]) -> tuple[dict[str, Any], nn.Module]:
    """Prune a copy of ``base`` with one method under the shared budget; return its figures and model."""
    model = copy.deepcopy(base)
    started = time.perf_counter()
    row: dict[str, Any] = {"method": method}
    if method == "tp-groupnorm":
        import torch_pruning as tp

        half = args.epochs // 2
        last = model.get_submodule("fc") if hasattr(model, "fc") else None
        pruner = tp.pruner.GroupNormPruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=args.tp_reg,
            global_pruning=True, pruning_ratio=0.9, iterative_steps=180,
            ignored_layers=[last] if last is not None else None,
        )
        if half:
            fit(GroupNormSparseSession(model, pruner), train, val, epochs=half, lr=args.lr, **fit_kw)
        _tp_prune_to_target(model, pruner, example, args.flops_target * base_macs)
        small = model
        row["acc_no_ft"], _ = evaluate(small, val)
        if args.epochs - half:
            fit(small, train, val, epochs=args.epochs - half, lr=args.lr, **fit_kw)
        row["acc_ft"], _ = evaluate(small, val)
    else:
        algo = "resrep" if method == "resrep-plain" else method
        cls = mslim.api.pruner_class(algo)
        options: dict[str, Any] = {"flops_target": args.flops_target}
        if algo == "resrep":
            if method == "resrep-plain":
                options["zeroing"] = "none"
            options.update(args.resrep_option)
        if cls.trains:
            session_epochs = args.epochs // 2 if method in SPLIT_BUDGET else args.epochs
            options = planned_options(algo, None, options, train, session_epochs)
            session = mslim.prepare(model, algo=algo, example_inputs=example, **options)
            if session_epochs:
                fit(session, train, val, epochs=session_epochs, lr=args.lr, **fit_kw)
            wrapped, _ = evaluate(session.model, val)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, _report = session.finalize()
            row["acc_no_ft"], _ = evaluate(small, val)
            row["finalize_delta"] = row["acc_no_ft"] - wrapped
            row["acc_ft"] = None
            if method in SPLIT_BUDGET:
                if args.epochs - session_epochs:
                    fit(small, train, val, epochs=args.epochs - session_epochs, lr=args.lr, **fit_kw)
                row["acc_ft"], _ = evaluate(small, val)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, _report = mslim.prune(model, algo=method, example_inputs=example, **options)
            row["acc_no_ft"], _ = evaluate(small, val)
            if args.epochs:
                fit(small, train, val, epochs=args.epochs, lr=args.lr, **fit_kw)
            row["acc_ft"], _ = evaluate(small, val)
    row["seconds"] = time.perf_counter() - started
    row["flops_ratio"] = count_cost(small, example).macs / base_macs
    row["params_ratio"] = count_cost(small, example).params / count_cost(base, example).params
    final = row["acc_ft"] if row["acc_ft"] is not None else row["acc_no_ft"]
    row["acc_final"] = final
    return row, small


def _mean_spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[Any], scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    if not values or all(v is None for v in values):
        return "-"
    mean, spread = _mean_spread([v for v in values if v is not None])
    if abs(scale * mean) < 0.5 * 10 ** -digits:
        mean = 0.0  # no "-0.00"
    sign = "+" if signed else ""
    return f"{scale * mean:{sign}.{digits}f} ± {scale * spread:.{digits}f}"


def summarize(results: dict[str, Any]) -> str:
    """A markdown table of mean ± standard deviation over seeds for every method."""
    seeds = results["seeds"]
    base = [s["base_accuracy"] for s in seeds]
    lines = [
        f"base accuracy: {_fmt(base)} % (n={len(seeds)} seeds)",
        "",
        "| method | FLOPs ratio | acc. no fine-tune (%) | acc. after fine-tune (%) | final vs base (pt) "
        "| finalize change (pt) | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in results["methods"]:
        rows = [next(r for r in s["rows"] if r["method"] == method) for s in seeds]
        delta = [r["acc_final"] - s["base_accuracy"] for r, s in zip(rows, seeds)]
        lines.append(
            f"| {method} | {_fmt([r['flops_ratio'] for r in rows], 1, 3)} "
            f"| {_fmt([r['acc_no_ft'] for r in rows])} | {_fmt([r['acc_ft'] for r in rows])} "
            f"| {_fmt(delta, signed=True)} | {_fmt([r.get('finalize_delta') for r in rows], signed=True)} "
            f"| {_fmt([r['seconds'] for r in rows], 1, 0)} |"
        )
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    """Final accuracy against FLOPs ratio (mean and spread per method), with the base model at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mslim_core.atomic import atomic_open

    seeds = results["seeds"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    base_mean, base_sd = _mean_spread([s["base_accuracy"] for s in seeds])
    ax.errorbar([1.0], [100 * base_mean], yerr=[100 * base_sd], fmt="s", color="black", label="base", capsize=3)
    for method in results["methods"]:
        rows = [next(r for r in s["rows"] if r["method"] == method) for s in seeds]
        fx, fsd = _mean_spread([r["flops_ratio"] for r in rows])
        ay, asd = _mean_spread([r["acc_final"] for r in rows])
        ax.errorbar([fx], [100 * ay], xerr=[fsd], yerr=[100 * asd], fmt="o", capsize=3, label=method)
    ax.axvline(results["flops_target"], color="#999999", linestyle="--", linewidth=0.8)
    ax.set_xlabel("FLOPs kept (fraction of the base model)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{results['model']} on {results['data']}: accuracy against FLOPs ({len(seeds)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="KIND[:PATH] (default digits)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--image-size", type=int, default=16, help="digits upscaling (0: keep the dataset's size)")
    p.add_argument("--flops-target", type=float, default=0.471)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=60, help="training budget after the base model, per method")
    p.add_argument("--lr", type=float, default=0.03, help="learning rate after the base model (every method)")
    p.add_argument("--base-lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; 'all' adds every algorithm")
    p.add_argument("--tp-reg", type=float, default=5e-4, help="GroupNormPruner regularisation strength")
    p.add_argument("--resrep-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ResRep option for both resrep methods (value read as JSON)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON results (default bench/results/accuracy-<data>.json)")
    p.add_argument("--chart", default=None, help="PNG chart of accuracy against FLOPs")
    p.add_argument("--save-models", default=None, help="folder for the seed's pruned models (for bench/latency.py)")
    args = p.parse_args(argv)
    from mslim.cli.arguments import parse_options

    args.resrep_option = parse_options(args.resrep_option)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "all" in methods:
        methods = [m for m in methods if m != "all"]
        methods += [a.name for a in mslim.algorithms() if a.name not in methods and a.name != "resrep"]
    args.methods = methods
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every method for every seed, print the table, write JSON (and the chart)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kind = args.data.split(":", 1)[0]
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"accuracy-{kind}.json"
    results: dict[str, Any] = {
        "command": " ".join(["python bench/accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "data": args.data, "model": args.model, "flops_target": args.flops_target, "methods": args.methods,
        "settings": {k: v for k, v in vars(args).items() if k not in ("methods",)},
        "hardware": hardware(args.threads), "seeds": [],
    }
    fit_kw: dict[str, Any] = {"progress": False}
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    for seed in args.seeds:
        torch.manual_seed(seed)
        size = args.image_size if args.image_size and kind in ("digits", "folder") else None
        splits = load_dataset(args.data, seed=seed, size=size)
        train, val = make_loaders(splits, args.batch_size, seed=seed)
        example = next(iter(val))[0][:8].clone()
        base = create(args.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
        t0 = time.perf_counter()
        fit(base, train, val, epochs=args.base_epochs, lr=args.base_lr, **fit_kw)
        base_acc, _ = evaluate(base, val)
        base_macs = count_cost(base, example).macs
        log(f"seed {seed}: base {100 * base_acc:.2f}% in {time.perf_counter() - t0:.0f}s")
        record: dict[str, Any] = {"seed": seed, "base_accuracy": base_acc, "base_macs": base_macs, "rows": []}
        for method in args.methods:
            torch.manual_seed(seed)
            row, small = run_method(method, base, example, train, val, args, base_macs, fit_kw)
            record["rows"].append(row)
            log(f"seed {seed}: {method}: FLOPs {row['flops_ratio']:.3f}, no-FT {100 * row['acc_no_ft']:.2f}%, "
                f"final {100 * row['acc_final']:.2f}% ({row['seconds']:.0f}s)")
            if args.save_models and seed == args.seeds[0]:
                folder = Path(args.save_models)
                folder.mkdir(parents=True, exist_ok=True)
                small.eval()
                report = mslim.PruneReport(
                    algorithm=method, macs_before=base_macs, macs_after=count_cost(small, example).macs,
                    params_before=count_cost(base, example).params, params_after=count_cost(small, example).params,
                    extra={"zoo_model": {"model": args.model, "num_classes": splits.num_classes,
                                         "in_channels": splits.in_channels, "input_shape": list(splits.input_shape)}},
                )
                mslim.save(small, folder / f"{method}.mslim", report=report, example_inputs=example[:2])
                if not (folder / "base.mslim").exists():
                    mslim.save(base, folder / "base.mslim", report=report.model_copy(update={"algorithm": "base"}),
                               example_inputs=example[:2])
        results["seeds"].append(record)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    table = summarize(results)
    print(table)
    if args.chart:
        chart(results, Path(args.chart))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
