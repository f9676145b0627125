"""``mslim train``: the full run for any registered algorithm and zoo model, on any dataset kind."""

from __future__ import annotations

import argparse
from pathlib import Path

from mslim import distributed
from mslim.cli.arguments import (
    add_latency_arguments,
    fraction,
    nonnegative_int,
    parse_options,
    positive_float,
    positive_int,
    timestamped_folder,
)
from mslim.cli.summary import format_comparison
from mslim.pipeline import RunSpec, run
from mslim_core.errors import ConfigError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``mslim train``."""
    p = sub.add_parser(
        "train",
        help="train a base model, prune it with an algorithm, measure and save the result",
        description="Train a zoo model on a dataset, prune it with any registered algorithm (training "
        "algorithms prune while training, then finalize; one-shot ones prune the trained model), fine-tune "
        "the pruned model (--finetune-epochs), print a before/after table and write the pruned model, "
        "report.json and a chart. "
        "Works under torchrun (DistributedDataParallel; only rank 0 writes).",
    )
    p.add_argument("--algo", required=True, help="algorithm name (see `mslim algorithms`)")
    p.add_argument("--model", default="resnet20", help="zoo model name (default resnet20)")
    p.add_argument("--data", default="digits", help="KIND[:PATH], e.g. digits, cifar10:~/data (default digits)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="resize digits/folder images to this side (a multiple of 8 for digits)")
    p.add_argument("--flops-target", type=fraction, default=None,
                   help="fraction of FLOPs to keep, in (0, 1] (default: the algorithm's)")
    p.add_argument("--recipe", default=None, help="TOML/JSON recipe of algorithm options")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an algorithm option, value read as JSON when it parses (repeatable)")
    p.add_argument("--epochs", type=nonnegative_int, default=20,
                   help="pruning epochs (training algorithms) or fine-tuning epochs (one-shot, unless "
                   "--finetune-epochs is given; 0: none)")
    p.add_argument("--finetune-epochs", type=nonnegative_int, default=None, metavar="N",
                   help="fine-tuning epochs of the pruned model after finalize (training algorithms) or after "
                   "one-shot pruning; 0: none (default: 0 for training algorithms, --epochs for one-shot ones)")
    p.add_argument("--base-epochs", type=nonnegative_int, default=20, help="base-model training epochs")
    p.add_argument("--base-weights", default=None,
                   help="start from these base weights (a trainer last.pt or a state dict) instead of training")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate of the pruning/fine-tuning phase")
    p.add_argument("--base-lr", type=positive_float, default=0.1, help="learning rate of base training")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default 1e-4)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size per process (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and splits")
    p.add_argument("--device", default=None, help="training device, e.g. cpu, cuda, cuda:1 (default: CUDA if available)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads for the latency measurement")
    add_latency_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default=None, help="output folder (default: a new mslim-train-... folder here)")
    p.add_argument("--resume", action="store_true", help="continue the run stopped in --out")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Run the pipeline from the parsed arguments and print the comparison table."""
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out, the folder of the run to continue")
    options = parse_options(args.option)
    if "flops_target" in options and args.flops_target is not None:
        raise ConfigError("flops_target is given twice (--flops-target and --option flops_target=...)")
    joined = distributed.init_from_env()
    try:
        out = Path(args.out) if args.out else timestamped_folder(f"mslim-train-{args.algo}-{args.model}")
        out = Path(distributed.broadcast_object(str(out)))
        spec = RunSpec(
            algo=args.algo, model=args.model, data=args.data, image_size=args.image_size,
            flops_target=args.flops_target if args.flops_target is not None else options.pop("flops_target", None),
            epochs=args.epochs, finetune_epochs=args.finetune_epochs, base_epochs=args.base_epochs, lr=args.lr,
            base_lr=args.base_lr, momentum=args.momentum, weight_decay=args.weight_decay,
            batch_size=args.batch_size, seed=args.seed,
            options=options, recipe=args.recipe, base_weights=args.base_weights, threads=args.threads,
            measure_latency=not args.no_latency, channels_last=args.channels_last,
            latency_runtime=args.latency_runtime, progress=not args.no_progress,
            device=args.device,
        )
        result = run(spec, out, resume=args.resume)
        if distributed.is_main():
            print(format_comparison(result))
            print()
            for what, path in result.files.items():
                print(f"{what:<8} {path}")
    finally:
        if joined:
            distributed.destroy()
    return 0
