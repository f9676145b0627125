"""``mslim demo``: the main job on built-in data in a few minutes on a laptop CPU.

Trains a CIFAR-style ResNet-20 on scikit-learn's handwritten digits, prunes it with ResRep to
keep 47.1% of its FLOPs, finalizes, and prints and writes the before/after comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mslim.cli.arguments import add_latency_arguments, nonnegative_int, positive_int, timestamped_folder
from mslim.cli.summary import format_comparison
from mslim.pipeline import RunSpec, run

DEMO_BASE_EPOCHS = 30
DEMO_EPOCHS = 60
DEMO_IMAGE_SIZE = 16


def demo_spec(epochs: int = DEMO_EPOCHS, base_epochs: int = DEMO_BASE_EPOCHS, seed: int = 0,
              image_size: int = DEMO_IMAGE_SIZE, progress: bool = True, measure_latency: bool = True,
              channels_last: bool = False, latency_runtime: str = "torch") -> RunSpec:
    """The demo's run: ResNet-20 on digits, ResRep to flops_target 0.471 with its short-schedule defaults."""
    return RunSpec(
        algo="resrep", model="resnet20", data="digits", image_size=image_size, flops_target=0.471,
        epochs=epochs, base_epochs=base_epochs, lr=0.03, base_lr=0.1, batch_size=64, seed=seed,
        threads=2, measure_latency=measure_latency, channels_last=channels_last, progress=progress,
        latency_runtime=latency_runtime,
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``mslim demo``."""
    p = sub.add_parser(
        "demo",
        help="train ResNet-20 on digits, prune it with ResRep (52.9%% fewer FLOPs), compare (a few minutes)",
        description="Train a CIFAR-style ResNet-20 on scikit-learn's handwritten digits, prune it with ResRep "
        "to keep 47.1% of its FLOPs, finalize, and print accuracy, MACs, parameters and CPU latency before "
        "and after. Writes the pruned model, report.json and layer_widths.png under --out.",
    )
    p.add_argument("--out", default=None, help="output folder (default: a new mslim-demo-YYYYmmdd-HHMMSS folder here)")
    p.add_argument("--epochs", type=positive_int, default=DEMO_EPOCHS,
                   help=f"ResRep training epochs (default {DEMO_EPOCHS})")
    p.add_argument("--base-epochs", type=nonnegative_int, default=DEMO_BASE_EPOCHS,
                   help=f"base-model training epochs (default {DEMO_BASE_EPOCHS})")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data split and order")
    p.add_argument("--image-size", type=positive_int, default=DEMO_IMAGE_SIZE, choices=(8, 16, 32),
                   help=f"digits are upscaled from 8x8 to this side (default {DEMO_IMAGE_SIZE})")
    add_latency_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo and print the comparison and where the files are."""
    out = Path(args.out) if args.out else timestamped_folder("mslim-demo")
    spec = demo_spec(args.epochs, args.base_epochs, args.seed, args.image_size, progress=not args.no_progress,
                     measure_latency=not args.no_latency, channels_last=args.channels_last,
                     latency_runtime=args.latency_runtime)
    result = run(spec, out)
    print()
    print(f"ResNet-20 on digits, pruned by ResRep to keep {spec.flops_target} of its FLOPs "
          f"({result.seconds['total']:.0f} s)")
    print(format_comparison(result))
    print()
    for what, path in result.files.items():
        print(f"{what:<8} {path}")
    return 0
