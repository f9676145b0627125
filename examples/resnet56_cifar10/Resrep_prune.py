"""Step 3: fold BN and compactors into the convs and remove the channels whose compactor rows are below a threshold.

    python Resrep_prune.py --wrapped_model best.pt --threshold 1e-5 --out pruned.mslim

Rebuilds the wrapped model from the training checkpoint (architecture from the zoo, options and
masks from the checkpoint's ResRep state), finalizes it with no fine-tuning, prints the report and
writes the smaller model with ``mslim.save``. Load it with
``mslim.load("pruned.mslim", model=lambda: mslim.models.create("resnet56"))``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from cifar_common import accuracy, cifar_loaders, positive_int

import mslim
from mslim.algorithms.pytorch.prune.Resrep_pruner import ResRep
from mslim.models import create
from mslim_core.checkpoint import load_checkpoint
from mslim_core.errors import CheckpointError

log = logging.getLogger("Resrep_prune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (every number typed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wrapped_model", default="best.pt", help="training checkpoint written by Resrep_train.py")
    p.add_argument("--threshold", type=float, default=1e-5, help="remove compactor rows with an L2 norm below this")
    p.add_argument("--round_to", type=positive_int, default=None, help="keep a multiple of N channels per layer")
    p.add_argument("--out", default="pruned.mslim", help="where the pruned model goes (mslim format)")
    p.add_argument("--data", default=None, help="optional: the CIFAR-10 folder, to print test accuracies")
    return p.parse_args(argv)


def rebuild(path: Path) -> tuple[ResRep, dict]:
    """The ResRep object of the training run, with the checkpoint's weights, masks and schedule position."""
    state = load_checkpoint(path, restore_rng=False).state
    extra, session = state.get("extra") or {}, state.get("session")
    if "model" not in extra or not isinstance(session, dict) or session.get("algorithm") != "resrep":
        raise CheckpointError(f"'{path}' is not a ResRep checkpoint written by Resrep_train.py")
    example = torch.randn(extra["input_shape"], generator=torch.Generator().manual_seed(0))
    obj = ResRep(create(extra["model"], num_classes=int(extra["num_classes"])), example_inputs=example,
                 **session["config"])
    load_checkpoint(path, model=obj.wrapped_model, session=obj.session, restore_rng=False)
    return obj, extra


def main(argv: list[str] | None = None) -> int:
    """Rebuild, finalize, report, save."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    obj, extra = rebuild(Path(args.wrapped_model))
    wrapped = obj.wrapped_model
    if args.round_to is not None:
        obj.pruner.configure(round_to=args.round_to)
    small, report = obj.finalize(threshold=args.threshold)
    print(report.summary())
    if args.data:
        _, val_loader = cifar_loaders(args.data, 256, 0, torch.device("cpu"))
        print(f"test accuracy: wrapped {accuracy(wrapped, val_loader):.2f}%, pruned {accuracy(small, val_loader):.2f}%")
    example = obj.pruner.example_inputs
    mslim.save(small, args.out, report, original=lambda: create(extra["model"], num_classes=int(extra["num_classes"])),
               example_inputs=example)
    print(f"pruned model written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
