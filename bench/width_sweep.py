"""Width sweep: how close to the ideal speed-up can any channel allocation get at one MACs ratio, here?

Draws random per-unit widths (multiples of ``--round-to``) for a zoo model, keeps the allocations
whose MACs ratio is within ``--tolerance`` of ``--flops-target``, builds each one with the channel
engine and times it against the base model exactly as bench/latency.py does (deploy form, pairs
timed alternately, median over rounds of each round's best). The best share of the ideal over many
allocations is an estimate of the most any pruning algorithm can reach for this model, input size
and runtime on this machine, whichever channels it picks.

    PYTHONPATH=.:plugins python bench/width_sweep.py --zoo resnet20@1x16x16 --samples 40
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from latency import parse_zoo, timed_pair, write_rows  # noqa: E402

from mslim.models import create  # noqa: E402
from mslim_core.cost import CostModel, count_cost  # noqa: E402
from mslim_core.graph import ChannelGraph  # noqa: E402

VARIANTS = {"torch-contiguous": ("torch", False), "torch-channels-last": ("torch", True),
            "onnxruntime": ("onnxruntime", False)}


def sample_widths(cost: CostModel, target: float, tolerance: float, multiple: int, samples: int,
                  generator: torch.Generator, draws: int = 20_000) -> torch.Tensor:
    """Up to ``samples`` distinct random width vectors (multiples of ``multiple``) within ``tolerance`` of ``target``.

    Each unit keeps a uniform random share of its channels between 10% and 100%, rounded up to the
    multiple (a unit narrower than the multiple keeps its width); draws are filtered by MACs ratio.
    """
    full = cost.initial_widths()
    share = torch.rand(draws, len(full), generator=generator) * 0.9 + 0.1
    step = torch.where(full >= multiple, torch.full_like(full, multiple), full)
    widths = torch.minimum(torch.ceil(share * full / step).long() * step, full)
    ratios = cost.macs(widths).double() / cost.macs(full)
    inside = torch.unique(widths[(ratios - target).abs() <= tolerance], dim=0)
    return inside[torch.randperm(len(inside), generator=generator)][:samples]


def build(base: nn.Module, example: torch.Tensor, unit_names: list[str], widths: torch.Tensor) -> nn.Module:
    """A copy of ``base`` whose units keep their first ``widths`` channels (which ones does not matter for time)."""
    model = copy.deepcopy(base)
    graph = ChannelGraph(model, example)
    for name, width in zip(unit_names, widths.tolist()):
        channels = graph.unit(name).channels
        if width < channels:
            graph.remove_channels(name, list(range(width, channels)))
    return model


def main(argv: list[str] | None = None) -> int:
    """Time every sampled allocation against the base model and print the best share of the ideal."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="resnet20@1x16x16", help="one NAME@CxHxW entry")
    p.add_argument("--flops-target", type=float, default=0.471)
    p.add_argument("--tolerance", type=float, default=0.01, help="largest |MACs ratio - target| kept")
    p.add_argument("--round-to", type=int, default=8, help="width multiple of every pruned unit")
    p.add_argument("--units", choices=("all", "internal"), default="all",
                   help="every unit, or only block-internal (independent) ones, ResRep's set")
    p.add_argument("--samples", type=int, default=30, help="allocations to time")
    p.add_argument("--runtime", nargs="+", choices=sorted(VARIANTS), default=["torch-channels-last", "onnxruntime"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.2, help="minimum timed seconds per measurement")
    p.add_argument("--min-runs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "width-sweep.json"))
    args = p.parse_args(argv)
    entries = parse_zoo(args.zoo, (3, 32, 32))
    if len(entries) != 1:
        raise SystemExit(f"--zoo takes one NAME@CxHxW entry, got {args.zoo!r}")
    ((name, shape),) = entries
    torch.manual_seed(args.seed)
    base = create(name, in_channels=shape[0]).eval()
    example = torch.randn(1, *shape)
    graph = ChannelGraph(base, example)
    units = [u for u in graph.units if args.units == "all" or u.independent]
    cost = CostModel(base, example, units)
    allocations = sample_widths(cost, args.flops_target, args.tolerance, args.round_to, args.samples,
                                torch.Generator().manual_seed(args.seed))
    if not len(allocations):
        raise SystemExit(f"no allocation of {name} in multiples of {args.round_to} is within {args.tolerance} of "
                         f"MACs ratio {args.flops_target}; raise --tolerance or lower --round-to")
    names = [u.name for u in units]
    base_macs = count_cost(base, example).macs
    rows: list[dict[str, Any]] = []
    for i, widths in enumerate(allocations):
        small = build(base, example, names, widths).eval()
        ideal = base_macs / count_cost(small, example).macs
        for variant in args.runtime:
            runtime, channels_last = VARIANTS[variant]
            timed = timed_pair(base, small, shape, args.batches, args.threads, args.rounds, args.seconds,
                               channels_last=channels_last, min_runs=args.min_runs, runtime=runtime)
            for batch, (t_base, t_small) in timed.items():
                rows.append({"allocation": i, "widths": dict(zip(names, widths.tolist())), "runtime": variant,
                             "batch": batch, "base_ms": t_base, "pruned_ms": t_small, "ideal": ideal,
                             "of_ideal": t_base / t_small / ideal})
                print(f"allocation {i:3d} {variant:20s} batch {batch:3d}: {t_base / t_small:.2f}x of {ideal:.2f}x "
                      f"({100 * rows[-1]['of_ideal']:.0f}%)", file=sys.stderr, flush=True)
    lines = ["| runtime | batch | allocations | best of ideal | median of ideal | best allocation's speed-up |",
             "|---|---|---|---|---|---|"]
    for variant in args.runtime:
        for batch in args.batches:
            cell = sorted((r for r in rows if r["runtime"] == variant and r["batch"] == batch),
                          key=lambda r: r["of_ideal"])
            best = cell[-1]
            lines.append(f"| {variant} | {batch} | {len(cell)} | {100 * best['of_ideal']:.0f}% | "
                         f"{100 * cell[len(cell) // 2]['of_ideal']:.0f}% | "
                         f"{best['base_ms'] / best['pruned_ms']:.2f}x of {best['ideal']:.2f}x |")
    print("\n".join(lines))
    write_rows(Path(args.out), "bench/width_sweep.py", argv, args.threads, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
