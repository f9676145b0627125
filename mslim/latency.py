"""CPU inference latency of a model at given batch sizes and thread count (median of timed runs).

Models are timed in eval mode under ``torch.inference_mode``, or in ONNX Runtime
(``runtime="onnxruntime"``); ``deploy_form`` folds BatchNorm into the preceding convs first, so a
base model and a pruned one (whose BN is already folded) are compared on the same footing.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

from mslim_core.errors import MslimError
from mslim_core.tracing import preserved_modes

if TYPE_CHECKING:
    from mslim.onnx_runtime import OnnxRuntimeModel

__all__ = ["RUNTIMES", "Latency", "channel_block", "deploy_form", "measure_latency", "torch_threads"]

RUNTIMES = ("torch", "onnxruntime")
"""Where ``measure_latency`` can run a model: eager torch, or ONNX Runtime's CPU session."""


def channel_block() -> int:
    """Channels per vector block of this CPU's fp32 convolution kernels: 16 with AVX-512, else 8.

    Widths that are a multiple of it run at full speed; the ``round_to`` to prune with for this CPU.
    """
    return 16 if "AVX512" in torch.backends.cpu.get_cpu_capability().upper() else 8


@dataclass(frozen=True)
class Latency:
    """Median (and spread) of the wall time of one forward pass at one batch size, in milliseconds."""

    batch: int
    threads: int
    median_ms: float
    min_ms: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count after."""
    if not isinstance(threads, int) or threads < 1:
        raise MslimError(f"threads must be a positive integer, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def deploy_form(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """An eval-mode copy with every registered fusion (conv+BN, ...) applied: what one would deploy."""
    from mslim_core.fusion import fuse_model

    with preserved_modes(model, train=False):
        fused = fuse_model(model, example_input[:1], inplace=False)
    return fused.eval()


def measure_latency(
    model: nn.Module | OnnxRuntimeModel,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    threads: int = 2,
    min_runs: int = 10,
    min_seconds: float = 0.5,
    warmup: int = 3,
    channels_last: bool = False,
    runtime: str = "torch",
) -> dict[int, Latency]:
    """Time ``model`` on random inputs of shape ``(batch, *input_shape)`` for each batch size.

    Each batch size gets ``warmup`` untimed runs, then at least ``min_runs`` timed runs and at
    least ``min_seconds`` of them; the median (and the best) is reported. ``channels_last`` times a
    copy of the model with 4-D weights and inputs in channels-last memory format (torch only).
    ``runtime="onnxruntime"`` exports the model and times it in an ONNX Runtime CPU session; an
    :class:`~mslim.onnx_runtime.OnnxRuntimeModel` built beforehand is timed as it is.
    """
    from mslim.onnx_runtime import OnnxRuntimeModel, onnxruntime_model

    if runtime not in RUNTIMES:
        raise MslimError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if isinstance(model, OnnxRuntimeModel):
        runtime = "onnxruntime"
        if model.threads != threads:
            raise MslimError(
                f"this ONNX Runtime session was built with {model.threads} threads, but threads={threads} "
                f"was asked for; build it with onnxruntime_model(..., threads={threads})"
            )
    if runtime == "onnxruntime":
        if channels_last:
            raise MslimError("channels_last applies to the torch runtime only: ONNX Runtime picks its own layout")
        session = model if isinstance(model, OnnxRuntimeModel) else onnxruntime_model(
            model, torch.randn(1, *input_shape), threads=threads)
        return {
            batch: _timed(lambda x=torch.randn(batch, *input_shape).numpy(): session.run(x),
                          batch, threads, min_runs, min_seconds, warmup)
            for batch in batch_sizes
        }
    results: dict[int, Latency] = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch_threads(threads), preserved_modes(model, train=False), torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, *input_shape, device=device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            results[batch] = _timed(lambda x=x: model(x), batch, threads, min_runs, min_seconds, warmup)
    return results


def _timed(call: Callable[[], Any], batch: int, threads: int, min_runs: int, min_seconds: float,
           warmup: int) -> Latency:
    """``warmup`` untimed calls, then at least ``min_runs`` timed ones lasting at least ``min_seconds``."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10_000:
            break
    return Latency(batch, threads, 1000 * statistics.median(times), 1000 * min(times), len(times))
