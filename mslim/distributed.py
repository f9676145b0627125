"""Process-group helpers for training under ``torchrun``: who am I, how many are we, start and stop.

Everything here degrades to single-process answers (rank 0 of 1) when no process group exists,
so callers never need to branch on whether they run distributed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from mslim_core.errors import TrainingError

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "destroy",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    The backend defaults to NCCL with CUDA and gloo on CPU. Returns True when running distributed.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    size = os.environ.get("WORLD_SIZE", "1")
    try:
        size_value = int(size)
    except ValueError:
        raise TrainingError(f"WORLD_SIZE must be an integer, got {size!r}") from None
    if size_value <= 1:
        return False
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def destroy() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum a few numbers over every process (float64); returns them unchanged when not distributed."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device or _collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu()]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, indexed by rank (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
