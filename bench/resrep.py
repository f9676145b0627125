"""ResRep benchmark: training-step overhead, mask-update and finalize times, and short schedules.

1. Train step on ResNet-56 (CIFAR shape, batch 64, random data): the wrapped model with
   ``after_backward`` + SGD step + ``session.step()`` (masks set, proximal shrink running) against
   the plain model with its SGD step. Both run interleaved in one process; medians per step.
2. One mask update (``ResRepPruner.update_masks``: global sort, skip rule, walk to the target)
   on ResNet-56 (32x32) and ResNet-50 (64x64), random compactor norms, from no masks to the target.
3. ``finalize`` on ResNet-56 with about half the compactor rows zero.
4. With ``--short``: the short-schedule problem on real data. ResNet-20 (``--short-model``) on scikit-learn digits,
   pre-trained, then ResRep for --epochs epochs with ``zeroing="proximal"`` (default) and with
   ``zeroing="none"`` (the paper's plain behaviour): accuracy of the wrapped and the finalized
   model, achieved FLOPs ratio, masked rows still above the threshold at the end.

    PYTHONPATH=.:plugins python bench/resrep.py [--steps 8] [--updates 30] [--short] [--epochs 30] [--seeds 0 1 2]
        [--short-model resnet20] [--short-only]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mslim
from mslim.models import create, example_input
from timing import median_time  # bench/timing.py (this folder is on sys.path when run as a script)
from mslim_core.errors import TargetNotReachedWarning


def train_step_overhead(steps: int, batch: int = 64) -> dict[str, float]:
    """Median seconds per step: plain ResNet-56 vs the ResRep-wrapped one (masks at the target)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    plain = create("resnet56")
    wrapped_model = copy.deepcopy(plain)
    session = mslim.prepare(wrapped_model, "resrep", example_inputs=x[:1], ignored_layers=["fc"],
                            before_mask_iters=0, total_iters=100_000)
    session.pruner.config.begin_granularity = 10_000
    opt_w = session.optimizer(lr=0.01)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def plain_step() -> None:
        opt_p.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt_p.step()

    def wrapped_step() -> None:
        opt_w.zero_grad()
        F.cross_entropy(session.model(x), y).backward()
        session.after_backward()
        opt_w.step()
        session.step()

    wrapped_step()  # iteration 0: the first mask update (walks straight to the target here)
    plain_step()
    assert session.pruner.masked_rows() > 0
    t_plain, t_wrapped = [], []
    for _ in range(steps):
        t_plain.append(median_time(plain_step, 1))
        t_wrapped.append(median_time(wrapped_step, 1))
    hooks = median_time(lambda: (session.after_backward(), session.pruner.step(50)), 20)
    return {
        "plain": statistics.median(t_plain),
        "wrapped": statistics.median(t_wrapped),
        "hooks": hooks,
        "flops_ratio": session.progress()["flops_ratio"],
    }


def mask_update_time(name: str, updates: int) -> tuple[float, int, int]:
    """(median seconds of one update from no masks to the target, compactor rows, rows masked)."""
    torch.manual_seed(0)
    x = example_input(name)
    session = mslim.prepare(create(name), "resrep", example_inputs=x, ignored_layers=["fc"], zeroing="none")
    pruner = session.pruner
    pruner.config.begin_granularity = 100_000
    with torch.no_grad():
        for c in pruner.compactors.values():
            c.weight.mul_(torch.rand(c.out_channels, 1, 1, 1) + 0.5)

    def one() -> None:
        pruner._masked_at[:] = -1
        pruner.update_masks(1000)

    one()
    return median_time(one, updates), pruner.bank.num_rows, pruner.masked_rows()


def finalize_time() -> tuple[float, float, float]:
    """(seconds, FLOPs ratio, max relative output diff) of finalize on ResNet-56 with half the rows zero."""
    torch.manual_seed(0)
    x = example_input("resnet56", batch=2)
    session = mslim.prepare(create("resnet56"), "resrep", example_inputs=x, ignored_layers=["fc"])
    with torch.no_grad():
        for c in session.pruner.compactors.values():
            c.weight[torch.rand(c.out_channels) < 0.5] = 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)
        _, report = session.finalize()
    return time.perf_counter() - start, report.flops_ratio, report.extra["max_output_rel_diff"]


# -- short schedules on real data ----------------------------------------------------------------


def _accuracy(model: nn.Module, loader: Any) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train()
    return correct / total


def _train(model: nn.Module, loader: Any, epochs: int, lr: float, opt: torch.optim.Optimizer,
           session: Any = None) -> None:
    total, it = epochs * len(loader), 0
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / total))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if session is not None:
                session.after_backward()
            opt.step()
            if session is not None:
                session.step()
            it += 1


def short_schedule(epochs: int, seed: int, base_epochs: int = 15, arch: str = "resnet20") -> dict[str, dict[str, float]]:
    """Digits + a CIFAR ResNet: base accuracy, then ResRep in both zeroing modes from the same base."""
    from mslim.data import load_dataset, make_loaders

    torch.manual_seed(seed)
    splits = load_dataset("digits")
    train, val = make_loaders(splits, 64, seed=seed)
    base = create(arch, in_channels=1)
    _train(base, train, base_epochs, 0.05, torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.9,
                                                               weight_decay=1e-4))
    results = {"base": {"accuracy": _accuracy(base, val)}}
    for mode in ("proximal", "none"):
        torch.manual_seed(seed + 1)
        session = mslim.prepare(copy.deepcopy(base), "resrep", example_inputs=splits.train_images[:2],
                                ignored_layers=["fc"], zeroing=mode, total_iters=epochs * len(train),
                                iters_per_epoch=len(train))
        opt = session.optimizer(lr=0.03)
        _train(session.model, train, epochs, 0.03, opt, session)
        wrapped = _accuracy(session.model, val)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TargetNotReachedWarning)
            small, report = session.finalize()
        results[mode] = {
            "wrapped": wrapped,
            "final": _accuracy(small, val),
            "flops_ratio": report.flops_ratio,
            "masked": report.extra["masked_rows"],
            "above": report.extra["masked_rows_above_threshold"],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed train steps per side")
    parser.add_argument("--updates", type=int, default=30, help="timed mask updates per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--short", action="store_true", help="also run the short-schedule comparison on digits")
    parser.add_argument("--epochs", type=int, default=30, help="ResRep epochs of the short-schedule run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--short-model", default="resnet20", help="model of the short-schedule run")
    parser.add_argument("--short-only", action="store_true", help="skip the timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s)")

    if not args.short_only:
        timings(args)
    if args.short or args.short_only:
        print(f"\n| digits, {args.short_model}, {args.epochs} ResRep epochs, flops_target 0.471 | seed | base | "
              "wrapped | finalized | FLOPs ratio | masked rows | masked rows >= threshold |")
        print("|---|---|---|---|---|---|---|---|")
        for seed in args.seeds:
            res = short_schedule(args.epochs, seed, arch=args.short_model)
            for mode in ("proximal", "none"):
                r = res[mode]
                label = "zeroing='proximal' (default)" if mode == "proximal" else "zeroing='none' (paper)"
                print(f"| {label} | {seed} | {res['base']['accuracy']:.4f} | {r['wrapped']:.4f} | "
                      f"{r['final']:.4f} | {r['flops_ratio']:.4f} | {r['masked']} | {r['above']} |", flush=True)


def timings(args: argparse.Namespace) -> None:
    """Print the train-step, mask-update and finalize tables."""
    step = train_step_overhead(args.steps)
    print("\n| ResNet-56, batch 64 | plain step | wrapped step | ratio | after_backward + step() |")
    print("|---|---|---|---|---|")
    print(f"| train step (CPU) | {step['plain'] * 1e3:.0f} ms | {step['wrapped'] * 1e3:.0f} ms | "
          f"{step['wrapped'] / step['plain']:.3f} | {step['hooks'] * 1e3:.2f} ms |")

    print("\n| mask update | compactor rows | rows masked at the target | median time |")
    print("|---|---|---|---|")
    for name in ("resnet56", "resnet50"):
        seconds, rows, masked = mask_update_time(name, args.updates)
        side = example_input(name).shape[-1]
        print(f"| {name} ({side}x{side}) | {rows} | {masked} | {seconds * 1e3:.2f} ms |")

    seconds, ratio, diff = finalize_time()
    print(f"\nfinalize ResNet-56 (half the rows zero): {seconds:.2f} s, FLOPs ratio {ratio:.3f}, "
          f"max relative output diff {diff:.2e}")


if __name__ == "__main__":
    main()
