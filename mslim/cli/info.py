"""``mslim info``: per-layer table (type, channels, MACs, parameters) and totals of a model or a file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mslim
from mslim.cli.summary import human
from mslim.cli.table import format_table
from mslim.layers import layer_rows
from mslim.models import available, create, example_input
from mslim.training import checkpoint_meta, load_training_checkpoint
from mslim_core.cost import count_cost
from mslim_core.io import file_kind, read_manifest
from mslim_core.errors import CheckpointError, MslimError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``mslim info``."""
    p = sub.add_parser(
        "info",
        help="per-layer table of a zoo model, a saved pruned model or a trainer checkpoint",
        description="Print every layer (name, type, in/out channels, MACs on one sample, parameters) and "
        "the totals. MODEL_OR_CKPT is a zoo model name, a pruned model saved by mslim, or a trainer "
        "checkpoint (last.pt).",
    )
    p.add_argument("target", metavar="MODEL_OR_CKPT")
    p.add_argument("--model", default=None, help="the zoo model a saved file was pruned from (if not recorded)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a zoo model (default 10)")
    p.add_argument("--in-channels", type=int, default=None, help="input channels of a zoo model (default 3)")
    p.add_argument("--input-size", type=int, default=None, help="input side for counting MACs (default: the zoo's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_info)


def _zoo(name: str, args: argparse.Namespace, meta: dict[str, Any] | None = None) -> tuple[nn.Module, torch.Tensor]:
    meta = meta or {}
    classes = args.num_classes or int(meta.get("num_classes", 10))
    channels = args.in_channels or int(meta.get("in_channels", 3))
    model = create(name, num_classes=classes, in_channels=channels)
    if args.input_size:
        x = torch.randn(1, channels, args.input_size, args.input_size)
    elif meta.get("input_shape"):
        x = torch.randn(1, *meta["input_shape"])
    else:
        x = example_input(name, in_channels=channels)
    return model, x


def _from_checkpoint(ckpt: dict[str, Any], args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, str]:
    meta = checkpoint_meta(ckpt)
    name = args.model or meta.get("model")
    if not name:
        raise MslimError("the checkpoint does not record its model: pass --model NAME")
    state = ckpt.get("session") or {}
    if state.get("algorithm"):
        from mslim.cli.finalize import rebuild_session

        session = rebuild_session(ckpt, name)
        _, x = _zoo(name, args, meta)
        return session.model, x, f"{name} wrapped by {state['algorithm']} (epoch {ckpt.get('epoch')})"
    model, x = _zoo(name, args, meta)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit {name!r}: {exc}") from None
    return model, x, f"{name} (trained {ckpt.get('epoch')} epochs)"


def _from_saved(path: Path, args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, str]:
    manifest = read_manifest(path)
    report = manifest.get("report") or {}
    zoo = dict((report.get("extra") or {}).get("zoo_model") or {})
    name = args.model or zoo.get("model")
    if not name:
        raise MslimError(f"{path} does not record which zoo model it was pruned from: pass --model NAME")
    if not zoo.get("input_shape") and manifest.get("probe"):
        zoo["input_shape"] = manifest["probe"]["inputs"][0][1:]
    original, x = _zoo(name, args, zoo)
    model = mslim.load(path, model=original)
    algo = manifest.get("algorithm")
    return model, x, f"{name} pruned{f' by {algo}' if algo else ''} ({path.name})"


def _resolve(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, str]:
    target = args.target
    path = Path(target).expanduser()
    if path.is_file():
        if file_kind(path) == "mslim":
            return _from_saved(path, args)
        return _from_checkpoint(load_training_checkpoint(path), args)
    if target in available():
        model, x = _zoo(target, args)
        return model, x, target
    raise MslimError(f"{target!r} is neither a file nor a zoo model; zoo models: {', '.join(available())}")


def run_info(args: argparse.Namespace) -> int:
    """Print the per-layer table and totals."""
    model, x, title = _resolve(args)
    rows = layer_rows(model, x)
    cost = count_cost(model, x)
    if args.json:
        print(json.dumps({"model": title, "input_shape": list(x.shape[1:]), "macs": cost.macs,
                          "params": cost.params, "layers": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print(f"{title}; input {tuple(x.shape[1:])}")
    table = [(r.name, r.type, "" if r.in_channels is None else r.in_channels,
              "" if r.out_channels is None else r.out_channels, f"{r.macs:,}" if r.macs else "", f"{r.params:,}")
             for r in rows]
    table.append(("total", "", "", "", f"{cost.macs:,}", f"{cost.params:,}"))
    print(format_table(["layer", "type", "in", "out", "MACs", "params"], table, align="llrrrr"))
    print(f"\n{human(cost.macs)} MACs per sample, {human(cost.params)} parameters, {len(rows)} layers")
    return 0
