"""``mslim finalize``: turn a trained wrapped checkpoint (a session's ``last.pt``) into the pruned model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mslim
from mslim.models import create
from mslim.api import pruner_class
from mslim.pipeline import save_model
from mslim.training import checkpoint_meta, load_training_checkpoint
from mslim_core.errors import CheckpointError, ConfigError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``mslim finalize``."""
    p = sub.add_parser(
        "finalize",
        help="turn a trained wrapped checkpoint into the pruned model",
        description="Rebuild the session a trainer checkpoint (last.pt of a pruning run) was written by, "
        "load its weights and state, and finalize: remove the pruned channels for good and save the model.",
    )
    p.add_argument("--wrapped-model", required=True, metavar="CKPT", help="the trainer checkpoint (last.pt)")
    p.add_argument("--threshold", type=float, default=None,
                   help="rows below this norm are removed (e.g. 1e-5; default: the value the run used)")
    p.add_argument("--model", default=None, help="zoo model name, if the checkpoint does not record it")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the pruned model")
    p.set_defaults(run=run_finalize)


def rebuild_session(ckpt: dict, model_name: str | None = None, **overrides: object) -> mslim.PruningSession:
    """The session a trainer checkpoint came from, weights and schedule state loaded."""
    state = ckpt.get("session") or {}
    algo = state.get("algorithm")
    if not algo:
        raise CheckpointError("the checkpoint holds plain training (no pruning session): nothing to finalize")
    meta = checkpoint_meta(ckpt)
    name = model_name or meta.get("model")
    if not name:
        raise ConfigError("the checkpoint does not record its model: pass --model NAME (a zoo model)")
    shape = meta.get("input_shape")
    if not shape:
        raise CheckpointError("the checkpoint does not record the model's input shape (meta.input_shape)")
    model = create(name, num_classes=int(meta.get("num_classes", 10)), in_channels=int(meta.get("in_channels", 3)))
    config = dict(state.get("config") or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in pruner_class(algo).Config.model_fields:
            raise ConfigError(f"algorithm {algo!r} has no option {key!r}")
        config[key] = value
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    session = mslim.prepare(model, algo=algo, example_inputs=example, **config)
    try:
        session.model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit {name!r} prepared for {algo!r}: {exc}") from None
    session.load_state_dict(state)
    return session


def run_finalize(args: argparse.Namespace) -> int:
    """Finalize and save; print the report summary."""
    ckpt = load_training_checkpoint(args.wrapped_model)
    session = rebuild_session(ckpt, args.model, threshold=args.threshold)
    example = session.pruner.example_inputs[0]
    small, report = session.finalize()
    meta = checkpoint_meta(ckpt)
    meta["model"] = args.model or meta["model"]
    path = save_model(small, Path(args.out), report, {"num_classes": 10, "in_channels": 3, **meta}, example)
    print(report.summary())
    print(f"pruned model written to {path}")
    return 0


__all__ = ["add_parsers", "rebuild_session", "run_finalize"]
