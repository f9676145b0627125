"""Run a model in ONNX Runtime on CPU: a deployment path whose fixed cost per layer is far below eager torch.

Needs the ``deploy`` extra (``pip install 'mslim[deploy]'``: onnx and onnxruntime). The model is
exported with :func:`mslim.export.export_onnx` (batch dimension dynamic) and loaded into a CPU
session with a fixed number of intra-op threads.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mslim_core.errors import MslimError

__all__ = ["OnnxRuntimeModel", "onnxruntime_model", "require_onnxruntime"]


def require_onnxruntime() -> Any:
    """The onnxruntime module, or an MslimError that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise MslimError(
            "running a model in ONNX Runtime needs the onnxruntime package, which is not installed: "
            "pip install 'mslim[deploy]'"
        ) from None
    return onnxruntime


class OnnxRuntimeModel:
    """An ONNX Runtime CPU session of one exported single-input, single-output model, called like it."""

    def __init__(self, session: Any, threads: int) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise MslimError(
                f"OnnxRuntimeModel runs models with one input and one output; this one has {len(inputs)} "
                f"inputs and {len(outputs)} outputs"
            )
        self.session = session
        self.threads = threads
        self.input_name: str = inputs[0].name

    def run(self, array: Any) -> Any:
        """The output for a float32 numpy array (no torch conversion: the path timed by benchmarks)."""
        return self.session.run(None, {self.input_name: array})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The output for a torch tensor, as a torch tensor (on the CPU)."""
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.run(array))


def onnxruntime_model(model: nn.Module, example_input: torch.Tensor, threads: int = 2) -> OnnxRuntimeModel:
    """Export ``model`` (eval mode, batch dimension dynamic) and load it into an ONNX Runtime CPU session.

    ``threads`` is the session's intra-op thread count (inter-op execution is sequential). A model
    on another device is exported from a CPU copy.
    """
    ort = require_onnxruntime()
    from mslim.export import export_onnx

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise MslimError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(example_input, torch.Tensor):
        raise MslimError(
            f"onnxruntime_model needs one example input tensor, got {type(example_input).__name__}"
        )
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).cpu()  # the session runs on the CPU; the caller's model stays where it is
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's notes on unused initialisers are noise here
    with tempfile.TemporaryDirectory(prefix="mslim-onnx-") as folder:
        path = export_onnx(model, Path(folder) / "model.onnx", example_input.detach().cpu())
        data = path.read_bytes()
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise MslimError(f"ONNX Runtime could not load the exported model: {type(exc).__name__}: {exc}") from exc
    return OnnxRuntimeModel(session, threads)
