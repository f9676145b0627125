"""Export a (pruned) model to ONNX, checked by loading it back with the ONNX checker.

Needs the ``onnx`` extra (``pip install 'mslim[onnx]'``). The file is written atomically.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from mslim_core.atomic import atomic_open
from mslim_core.errors import MslimError
from mslim_core.tracing import as_input_tuple, preserved_modes, run_model

__all__ = ["export_onnx"]

DEFAULT_OPSET = 17


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MslimError(
            "ONNX export needs the onnx package, which is not installed: pip install 'mslim[onnx]'"
        ) from None
    return onnx


def _export_bytes(model: nn.Module, inputs: tuple[Any, ...], opset: int, names: tuple[list[str], list[str]],
                  dynamic_batch: bool) -> bytes:
    """Run torch's ONNX exporter into memory (the TorchScript-based one, which needs only onnx)."""
    import torch

    input_names, output_names = names
    dynamic_axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's concern
        try:
            torch.onnx.export(
                model, inputs, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        except TypeError as exc:  # a torch without the TorchScript exporter: the torch.export one needs onnxscript
            if "dynamo" not in str(exc):
                raise
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise MslimError(
                    "this torch exports ONNX only through torch.export, which needs onnxscript: "
                    "pip install onnxscript"
                ) from None
            program = torch.onnx.export(model, inputs, opset_version=opset, input_names=input_names,
                                        output_names=output_names)
            program.save(buffer)
    return buffer.getvalue()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (in eval mode) to an ONNX file at ``path`` and check it with ``onnx.checker``.

    ``example_inputs``: a tensor (or tuple of tensors) shaped like one batch of input; the batch
    dimension is dynamic unless ``dynamic_batch=False``. Raises MslimError when onnx is missing.
    """
    onnx = _require_onnx()
    if not isinstance(model, nn.Module):
        raise MslimError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    outputs = run_model(model, inputs)  # a GraphError naming the shapes when the inputs do not fit
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    names = (
        ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))],
        ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)],
    )
    with preserved_modes(model, train=False):
        try:
            data = _export_bytes(model, inputs, opset, names, dynamic_batch)
        except MslimError:
            raise
        except Exception as exc:
            raise MslimError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    try:
        onnx.checker.check_model(onnx.load_model_from_string(data))
    except Exception as exc:
        raise MslimError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path
