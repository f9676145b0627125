"""CPU inference latency of a model at given batch sizes and thread count (median of timed runs).

Models are timed in eval mode under ``torch.inference_mode``; ``deploy_form`` folds BatchNorm
into the preceding convs first, so a base model and a pruned one (whose BN is already folded)
are compared on the same footing.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from mslim_core.errors import MslimError
from mslim_core.tracing import preserved_modes

__all__ = ["Latency", "deploy_form", "measure_latency", "torch_threads"]


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
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    threads: int = 2,
    min_runs: int = 10,
    min_seconds: float = 0.5,
    warmup: int = 3,
    channels_last: bool = False,
) -> dict[int, Latency]:
    """Time ``model`` on random inputs of shape ``(batch, *input_shape)`` for each batch size.

    Each batch size gets ``warmup`` untimed runs, then at least ``min_runs`` timed runs and at
    least ``min_seconds`` of them; the median (and the best) is reported. ``channels_last`` times a
    copy of the model with 4-D weights and inputs in channels-last memory format.
    """
    results: dict[int, Latency] = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch_threads(threads), preserved_modes(model, train=False), torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, *input_shape, device=device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(warmup):
                model(x)
            times: list[float] = []
            started = time.perf_counter()
            while len(times) < min_runs or time.perf_counter() - started < min_seconds:
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
                if len(times) >= 10_000:
                    break
            results[batch] = Latency(batch, threads, 1000 * statistics.median(times), 1000 * min(times), len(times))
    return results
