"""Training checkpoints: everything needed to resume a run, written atomically, read without pickled code.

A checkpoint is one ``torch.save`` file holding plain data only (tensors, numbers, strings,
lists, dicts), so it loads with ``weights_only=True``: the model's state dict, the optimizer's
(and optionally an LR scheduler's and a GradScaler's) state, the pruning session's state, the
RNG states (torch, CUDA, Python ``random``, NumPy), the epoch and iteration, and any ``extra``
plain data. It is written through ``mslim_core.atomic``: a crash mid-write keeps the
previous checkpoint. ``load_checkpoint`` checks everything before it changes anything.
"""

from __future__ import annotations

import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mslim_core.atomic import atomic_torch_save
from mslim_core.errors import CheckpointError, MslimError
from mslim_core.safe_load import safe_torch_load

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "TrainingCheckpoint", "load_checkpoint", "rng_states", "save_checkpoint",
    "set_rng_states", "unwrap_parallel",
]

CHECKPOINT_FORMAT = "mslim.checkpoint"
CHECKPOINT_VERSION = 1


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel wrappers."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def rng_states() -> dict[str, Any]:
    """The torch, CUDA, Python and NumPy random states as plain data."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but RNG capture must not need it
        return states
    key, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states["numpy"] = {
        "key": str(key),
        "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states captured by ``rng_states`` (CUDA only when the device count matches)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    np_state = states.get("numpy")
    if np_state:
        import numpy as np

        np.random.set_state((
            np_state["key"], np_state["state"].numpy().astype(np.uint32), int(np_state["pos"]),
            int(np_state["has_gauss"]), float(np_state["cached_gaussian"]),
        ))


@dataclass
class TrainingCheckpoint:
    """What ``load_checkpoint`` read: counters, the caller's extra data, and the raw states."""

    epoch: int
    iteration: int
    extra: dict[str, Any] = field(default_factory=dict)
    mslim_version: str = ""
    state: dict[str, Any] = field(default_factory=dict, repr=False)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    session: Any = None,
    extra: dict[str, Any] | None = None,
    *,
    epoch: int = 0,
    iteration: int = 0,
    scheduler: Any = None,
    scaler: Any = None,
) -> Path:
    """Write a resumable training checkpoint to ``path`` atomically (loadable with ``weights_only=True``).

    ``session`` is a PruningSession (its schedule state is saved); ``extra`` is plain data of
    the caller's (numbers, strings, lists, dicts, tensors), e.g. the best accuracy so far.
    """
    from mslim_core import __version__

    if not isinstance(model, nn.Module):
        raise MslimError(f"save_checkpoint needs a torch.nn.Module, got {type(model).__name__}")
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "mslim_version": __version__,
        "model_class": f"{type(unwrap_parallel(model)).__module__}.{type(unwrap_parallel(model)).__qualname__}",
        "epoch": int(epoch),
        "iteration": int(iteration),
        "model": {k: v.detach() for k, v in unwrap_parallel(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "session": session.state_dict() if session is not None else None,
        "rng": rng_states(),
        "extra": dict(extra or {}),
    }
    path = Path(path)
    atomic_torch_save(state, path)
    return path


def _check_model(path: Path, model: nn.Module, saved: dict[str, Any], saved_class: str) -> None:
    have = unwrap_parallel(model).state_dict()
    missing = [k for k in have if k not in saved]
    unexpected = [k for k in saved if k not in have]
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the file, {tuple(have[k].shape)} in the model"
        for k in have
        if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != have[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} entries missing from the file (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} entries the model lacks (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
        model_class = f"{type(unwrap_parallel(model)).__module__}.{type(unwrap_parallel(model)).__qualname__}"
        origin = f" (the file is from a {saved_class}, the model is a {model_class})" if saved_class != model_class else ""
        raise CheckpointError(
            f"checkpoint '{path}' does not fit the given model{origin}: {'; '.join(parts)}. Resume with the "
            "same model and the same pruning setup (e.g. mslim.prepare with the same algorithm) as the run that wrote it"
        )


def _check_optimizer(path: Path, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    if not isinstance(saved, dict) or "param_groups" not in saved:
        raise CheckpointError(f"checkpoint '{path}' holds no optimizer state; pass optimizer=None to skip it")
    want = [len(g["params"]) for g in optimizer.param_groups]
    got = [len(g.get("params", [])) for g in saved["param_groups"]]
    if want != got:
        raise CheckpointError(
            f"checkpoint '{path}': the optimizer state has parameter groups of sizes {got}, the given optimizer "
            f"{want}; build the optimizer the same way as the run that wrote the checkpoint"
        )


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    session: Any = None,
    *,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
    map_location: Any = "cpu",
) -> TrainingCheckpoint:
    """Read a checkpoint from ``save_checkpoint`` and restore what is passed in (model, optimizer, session, ...).

    The file, its format and the session's algorithm are checked before anything changes; the
    session is restored first (its state may change the architecture, as taylor's replayed
    removals do), then the model and optimizer are checked and loaded. Pickled code is refused.
    """
    path = Path(path)
    if _is_model_file(path):
        raise CheckpointError(f"'{path}' is a mslim model file, not a training checkpoint: read it with mslim.load")
    state = safe_torch_load(path, what=f"checkpoint '{path}'", map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"'{path}' is not a mslim training checkpoint (no '{CHECKPOINT_FORMAT}' format tag); "
            "checkpoints are written by mslim_core.checkpoint.save_checkpoint"
        )
    version = state.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {version!r} (written by mslim {state.get('mslim_version', '?')}); "
            f"this mslim reads versions up to {CHECKPOINT_VERSION}: upgrade mslim to resume from it"
        )
    if model is not None and not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint '{path}' holds no model state")
    for name, obj in (("scheduler", scheduler), ("scaler", scaler), ("session", session)):
        if obj is not None and state.get(name) is None:
            raise CheckpointError(f"checkpoint '{path}' holds no {name} state; pass {name}=None to skip it")
    if session is not None:
        saved = state["session"]
        if not isinstance(saved, dict) or saved.get("algorithm") != session.algorithm:
            raise CheckpointError(
                f"checkpoint '{path}' holds a session of algorithm {saved.get('algorithm') if isinstance(saved, dict) else None!r}, "
                f"the given session runs {session.algorithm!r}"
            )
        # restored before the weights are checked: a session's state may change the architecture
        # (taylor replays its channel removals on the fresh model), and the weights fit only then
        session.load_state_dict(saved)
    if model is not None:
        _check_model(path, model, state["model"], str(state.get("model_class", "?")))
    if optimizer is not None:
        _check_optimizer(path, optimizer, state.get("optimizer"))
    # everything checked: apply
    if model is not None:
        unwrap_parallel(model).load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and isinstance(state.get("rng"), dict):
        set_rng_states(state["rng"])
    return TrainingCheckpoint(
        epoch=int(state.get("epoch", 0)),
        iteration=int(state.get("iteration", 0)),
        extra=dict(state.get("extra") or {}),
        mslim_version=str(state.get("mslim_version", "")),
        state=state,
    )


def _is_model_file(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return "manifest.json" in archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False
