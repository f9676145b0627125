"""``mslim export MODEL_FILE --onnx OUT --model NAME``: a saved pruned model to ONNX."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from mslim_core.errors import MslimError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` verb."""
    p = sub.add_parser(
        "export",
        help="export a saved (pruned) model to ONNX",
        description="Rebuild a model saved with mslim.save on the zoo model it came from and write it as ONNX "
        "(needs the onnx extra: pip install 'mslim[onnx]').",
    )
    p.add_argument("model_file", metavar="MODEL_FILE", help="a file written by mslim.save (or mslim finalize --out)")
    p.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write")
    p.add_argument(
        "--model", metavar="NAME",
        help="the zoo model the file was pruned from (default: the one the file records, see docs/models.md)",
    )
    p.add_argument("--num-classes", type=int, help="classes of that model (default: recorded, else 10)")
    p.add_argument("--in-channels", type=int, help="input channels of that model (default: recorded, else 3)")
    p.add_argument(
        "--input-shape", metavar="N,C,H,W",
        help="example input shape (default: the shape stored in the file, else the zoo model's)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of making it dynamic")
    p.add_argument(
        "--trust", action="store_true",
        help="allow a legacy pickled checkpoint (runs code from the file: only for files you made)",
    )
    p.set_defaults(run=run_export)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; anything else is an MslimError naming the text."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise MslimError(f"--input-shape must be positive integers separated by commas, like 1,3,32,32; got {text!r}")
    return shape


def _recorded_zoo_model(path: str) -> dict[str, Any]:
    """The zoo model an mslim file records (``report.extra.zoo_model``, written by ``mslim finalize``), if any."""
    from mslim_core.io import file_kind, read_manifest

    if file_kind(path) != "mslim":
        return {}
    manifest = read_manifest(path)
    zoo = ((manifest.get("report") or {}).get("extra") or {}).get("zoo_model") or {}
    probe = (manifest.get("probe") or {}).get("inputs") or []
    return {**zoo, "probe_inputs": probe}


def run_export(args: argparse.Namespace) -> int:
    """Load the file onto the named zoo model, export it, print where it went."""
    from mslim import models
    from mslim.export import export_onnx
    from mslim_core.io import load

    recorded = _recorded_zoo_model(args.model_file)
    name = args.model or recorded.get("model")
    if not name:
        raise MslimError(f"'{args.model_file}' does not record the zoo model it was pruned from: pass --model NAME")
    models.info(name)  # an unknown name fails early, with the closest match
    num_classes = args.num_classes or int(recorded.get("num_classes") or 10)
    in_channels = args.in_channels or int(recorded.get("in_channels") or 3)

    def build() -> torch.nn.Module:
        return models.create(name, num_classes=num_classes, in_channels=in_channels)

    model = load(args.model_file, model=build, trust=args.trust)
    probe = recorded.get("probe_inputs") or []
    if args.input_shape:
        example = torch.randn(parse_shape(args.input_shape))
    elif len(probe) == 1:
        example = torch.randn(*probe[0])
    else:
        example = models.example_input(name, in_channels=in_channels)
    out = export_onnx(model, args.onnx, example, opset=args.opset, dynamic_batch=not args.static_batch)
    print(f"wrote {out} (input shape {tuple(example.shape)}, checked with onnx.checker)")
    return 0
