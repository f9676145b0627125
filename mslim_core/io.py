"""Save and load pruned models as one file that holds no pickled code.

File format (format version 1): a zip archive with
- ``manifest.json``: ``format`` ("mslim.model"), ``format_version``, ``mslim_version``,
  ``torch_version``, ``model_class``, ``modules`` (every module by qualified name with its
  type and, for standard layers, constructor arguments: see ``mslim_core.rebuild``),
  ``algorithm``/``config``/``report`` when a report was given, ``changes`` when the
  original model was given, ``probe`` when example inputs were given;
- ``weights.pt``: ``torch.save`` of the state dict (tensors only: read with ``weights_only=True``);
- ``probe.pt`` (optional): example inputs and the saved model's outputs on them; ``load``
  checks the rebuilt model reproduces them.

``load`` rebuilds the pruned architecture on a freshly built original model (the file
names the standard layers to resize or replace; custom module types come from the code
the user passes in), loads the weights strictly, and returns a new model; the model
passed in is never changed. Everything is written through ``mslim_core.atomic``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mslim_core.atomic import atomic_open
from mslim_core.checkpoint import CHECKPOINT_FORMAT, unwrap_parallel
from mslim_core.errors import CheckpointError, MslimError
from mslim_core.rebuild import Change, describe_modules, rebuild_modules, type_name
from mslim_core.safe_load import safe_torch_load
from mslim_core.tracing import as_input_tuple, run_model

__all__ = ["FORMAT", "FORMAT_VERSION", "describe_changes", "file_kind", "load", "read_manifest", "save"]

FORMAT = "mslim.model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
PROBE = "probe.pt"

ModelSource = nn.Module | Callable[[], nn.Module]


def _output_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _output_tensors(item)]
    if isinstance(obj, dict):
        return [t for key in sorted(obj, key=str) for t in _output_tensors(obj[key])]
    return []


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """TF32 off while computing or checking a probe: a GPU-saved probe must match a CPU reload closely."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return dict(report.to_dict())
    if isinstance(report, dict):
        return dict(report)
    raise MslimError(f"report must be a PruneReport or a dict, got {type(report).__name__}")


def save(
    model: nn.Module,
    path: str | Path,
    report: Any = None,
    *,
    original: ModelSource | None = None,
    example_inputs: Any = None,
) -> Path:
    """Write ``model`` to ``path`` as one mslim file (zip: JSON manifest + tensor-only weights), atomically.

    ``report`` (a PruneReport) records the algorithm and its config; a DataParallel/DDP wrapper is
    saved as the module inside. ``original`` (the unpruned
    model, or a function building it) checks now that the file loads onto it and records the
    changes; ``example_inputs`` stores a probe that ``load`` checks the outputs against.
    """
    if not isinstance(model, nn.Module):
        raise MslimError(f"mslim.save needs a torch.nn.Module, got {type(model).__name__}")
    from mslim_core import __version__

    model = unwrap_parallel(model)

    path = Path(path)
    entries = describe_modules(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise MslimError(f"the model's state dict holds non-tensor entries ({', '.join(bad[:3])}); cannot save it safely")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mslim_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "model_class": type_name(type(model)),
        "training": bool(model.training),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    rep = _report_dict(report)
    if rep is not None:
        manifest["algorithm"] = rep.get("algorithm")
        manifest["config"] = rep.get("config", {})
        manifest["report"] = rep
    if original is not None:
        fresh = _fresh_model(original)
        if type_name(type(fresh)) != manifest["model_class"]:
            raise CheckpointError(
                f"original= is a {type_name(type(fresh))} but the model to save is a {manifest['model_class']}"
            )
        rebuilt, changes = rebuild_modules(fresh, entries, what="the model to save")
        _load_weights(rebuilt, state, "the model to save")
        manifest["changes"] = [c.to_dict() for c in changes]
    probe: bytes | None = None
    if example_inputs is not None:
        inputs = tuple(t.detach() for t in as_input_tuple(example_inputs))
        with _full_precision():
            outputs = [t.detach() for t in _output_tensors(run_model(model, inputs))]
        probe_data = {"inputs": list(inputs), "outputs": outputs}
        if original is not None:  # the file will load back: prove it gives the same outputs
            _check_probe("the model to save (rebuilt on original=)", rebuilt, probe_data)
        buffer = io.BytesIO()
        torch.save(probe_data, buffer)
        probe = buffer.getvalue()
        manifest["probe"] = {"inputs": [list(t.shape) for t in inputs], "outputs": [list(t.shape) for t in outputs]}
    manifest["modules"] = entries
    try:
        text = json.dumps(manifest, indent=1)
    except (TypeError, ValueError) as exc:
        raise MslimError(f"the report cannot be written as JSON ({exc}); keep report.extra to plain data") from exc
    weights = io.BytesIO()
    torch.save(state, weights)
    with atomic_open(path, "wb") as handle:
        with zipfile.ZipFile(handle, "w") as archive:
            archive.writestr(MANIFEST, text, compress_type=zipfile.ZIP_DEFLATED)
            archive.writestr(WEIGHTS, weights.getvalue(), compress_type=zipfile.ZIP_STORED)
            if probe is not None:
                archive.writestr(PROBE, probe, compress_type=zipfile.ZIP_STORED)
    return path


def file_kind(path: str | Path) -> str:
    """What a file is, from its bytes: "mslim" (this format), "torch" (a torch.save zip),
    "pickle" (a legacy torch.save or a plain pickle), "damaged-zip", "empty" or "unknown"."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"'{path}': no such file") from None
    except OSError as exc:
        raise CheckpointError(f"'{path}' cannot be read ({exc})") from exc
    if not head:
        return "empty"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return "damaged-zip"
        return "mslim" if MANIFEST in names else "torch"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return "pickle"
    return "unknown"


def _damaged(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"'{path}' is truncated or corrupted ({detail}); restore it from a good copy or save the model again"
    )


def _read_archive(path: Path) -> tuple[dict[str, Any], bytes, bytes | None]:
    """The manifest (checked), the weights bytes and the probe bytes (or None) of an mslim file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            raw = archive.read(MANIFEST)
            manifest = json.loads(raw.decode("utf-8"))
            _check_manifest(path, manifest)
            if WEIGHTS not in names:
                raise _damaged(path, f"it has no {WEIGHTS}")
            weights = archive.read(WEIGHTS)
            probe = archive.read(PROBE) if PROBE in names else None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zipfile.LargeZipFile) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from exc
    return manifest, weights, probe


def _check_manifest(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is a zip file but not an mslim model file (no '{FORMAT}' manifest)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(path, f"format_version is {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"'{path}' was written by a newer mslim (file format version {version}, mslim "
            f"{manifest.get('mslim_version', '?')}); this mslim reads format versions up to {FORMAT_VERSION}: "
            "upgrade mslim to load it"
        )
    if not isinstance(manifest.get("modules"), list) or not isinstance(manifest.get("model_class"), str):
        raise _damaged(path, "its manifest has no module list")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The JSON manifest of an mslim file (no weights are read): architecture, algorithm, config, versions."""
    path = Path(path)
    kind = file_kind(path)
    if kind != "mslim":
        raise CheckpointError(f"'{path}' is not an mslim model file ({_kind_words(kind)})")
    return _read_archive(path)[0]


def _kind_words(kind: str) -> str:
    return {
        "torch": "it is a plain torch.save file",
        "pickle": "it is a pickle",
        "damaged-zip": "it is a truncated or corrupted zip archive",
        "empty": "it is empty: the write that made it was interrupted",
        "unknown": "its content is not a format mslim knows",
    }.get(kind, kind)


def _fresh_model(model: ModelSource | None) -> nn.Module:
    if model is None:
        raise CheckpointError(
            "mslim.load needs model=: the freshly built original (unpruned) model, or a function that builds "
            "it, e.g. mslim.load(path, model=lambda: create('resnet56')) after from mslim.models import create; "
            "an mslim file holds no code"
        )
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise CheckpointError(f"model= returned {type(built).__name__}, not a torch.nn.Module")
        return built
    raise CheckpointError(f"model= must be an nn.Module or a function returning one, got {type(model).__name__}")


def _read_probe(path: Path, probe: bytes, map_location: Any) -> dict[str, list[torch.Tensor]]:
    data = safe_torch_load(probe, what=f"the probe in '{path}'", map_location=map_location)
    ok = isinstance(data, dict) and all(
        isinstance(data.get(k), list) and all(isinstance(t, torch.Tensor) for t in data[k]) for k in ("inputs", "outputs")
    )
    if not ok:
        raise _damaged(path, "its probe is not lists of input and output tensors")
    return data


def _shapes(tensors: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors]


def _check_output_shapes(path: Path, fresh: nn.Module, data: dict[str, list[torch.Tensor]]) -> None:
    """Pruning and fusion never change a model's output shapes: a fresh model giving other shapes is another model."""
    ref = next((t for t in (*fresh.parameters(), *fresh.buffers()) if t.is_floating_point()), None)
    inputs = tuple(
        t.to(device=ref.device, dtype=ref.dtype) if ref is not None and t.is_floating_point() else t
        for t in data["inputs"]
    )  # the fresh model may still be in another dtype or on another device than the saved one
    try:
        got = _shapes(_output_tensors(run_model(fresh, inputs)))
    except MslimError as exc:
        raise CheckpointError(
            f"'{path}': the given model fails on the file's example inputs of shapes {_shapes(data['inputs'])}; "
            "was the file made from another model?"
        ) from exc
    want = _shapes(data["outputs"])
    if got != want:
        raise CheckpointError(
            f"'{path}' does not match the given model: the model gives outputs of shapes {got} but the saved "
            f"model gave {want} on the same inputs; the file was made from another model or configuration "
            "(for example another num_classes)"
        )


def _check_probe(what: str, model: nn.Module, data: dict[str, list[torch.Tensor]]) -> float:
    """Max difference of the rebuilt model's outputs from the saved ones, in units of the tolerance."""
    with _full_precision():
        outputs = _output_tensors(run_model(model, tuple(data["inputs"])))
    expected = data["outputs"]
    if _shapes(outputs) != _shapes(expected):
        raise CheckpointError(
            f"{what}: the rebuilt model's outputs have shapes {_shapes(outputs)}, the saved model's had "
            f"{_shapes(expected)}"
        )
    worst = 0.0
    for got, want in zip(outputs, expected):
        if not torch.is_floating_point(want):
            if not torch.equal(got.cpu(), want.cpu()):
                worst = math.inf
            continue
        want64, got64 = want.detach().double().cpu(), got.detach().double().cpu()
        if not want64.numel():
            continue
        both_nan = torch.isnan(want64) & torch.isnan(got64)
        same_inf = torch.isinf(want64) & (got64 == want64)
        gap = torch.where(both_nan | same_inf, torch.zeros_like(want64), (got64 - want64).abs())
        diff = float(torch.nan_to_num(gap, nan=math.inf).max())
        finite = want64[torch.isfinite(want64)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        tol = (1e-2 if want.dtype in (torch.float16, torch.bfloat16) else 1e-3) * max(1.0, scale)
        worst = max(worst, diff / tol)
    if not worst <= 1.0:
        raise CheckpointError(
            f"{what}: the rebuilt model does not reproduce the saved model's outputs on the stored example "
            "inputs; the model= given probably differs from the one the file was made from (custom module "
            "attributes, another configuration)"
        )
    return worst


def load(
    path: str | Path,
    model: ModelSource | None = None,
    *,
    trust: bool = False,
    map_location: Any = "cpu",
    verify: bool = True,
) -> nn.Module:
    """Load a model saved by ``save``, rebuilt on a copy of ``model`` (the fresh original, or a factory).

    Never unpickles code. Legacy pickled checkpoints (``torch.save(model)``) raise
    UnsafeCheckpointError unless ``trust=True`` (only for files you made); a plain state dict
    file is loaded strictly onto a copy of ``model``. ``verify`` checks a stored probe.
    """
    path = Path(path)
    kind = file_kind(path)
    if kind == "mslim":
        return _load_mslim(path, model, map_location, verify)
    if kind in ("torch", "pickle"):
        return _load_foreign(path, model, trust, map_location)
    if kind == "empty":
        raise CheckpointError(f"'{path}' is empty (0 bytes): the write that made it was interrupted")
    if kind == "damaged-zip":
        raise _damaged(path, "its zip directory is missing or unreadable")
    raise CheckpointError(f"'{path}' is not a model file mslim can read: {_kind_words(kind)}")


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict state-dict load that keeps the file's tensors (dtype, device); a misfit is a CheckpointError."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:4]
        raise CheckpointError(
            f"{what} does not match the given model: its weights do not fit the rebuilt layers "
            f"({'; '.join(lines)[:600]}); was the file made from another model?"
        ) from exc


def _load_mslim(path: Path, model: ModelSource | None, map_location: Any, verify: bool) -> nn.Module:
    manifest, weights, probe = _read_archive(path)
    state = safe_torch_load(weights, what=f"the weights in '{path}'", map_location=map_location)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _damaged(path, "its weights are not a state dict of tensors")
    fresh = _fresh_model(model)
    if type_name(type(fresh)) != manifest["model_class"]:
        raise CheckpointError(
            f"'{path}' holds a pruned {manifest['model_class']} but model= is a {type_name(type(fresh))}: "
            "pass the model the file was made from"
        )
    probe_data = _read_probe(path, probe, map_location) if probe is not None and verify else None
    if probe_data is not None:
        _check_output_shapes(path, fresh, probe_data)
    rebuilt, _changes = rebuild_modules(fresh, manifest["modules"], what=f"'{path}'")
    _load_weights(rebuilt, state, f"'{path}'")
    if probe_data is not None:
        _check_probe(f"'{path}'", rebuilt, probe_data)
    return rebuilt


def _load_foreign(path: Path, model: ModelSource | None, trust: bool, map_location: Any) -> nn.Module:
    """A file not in mslim's format: a plain state dict, or (only with trust) a pickled module."""
    obj = safe_torch_load(path, what=f"'{path}'", map_location=map_location, trust=trust)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"'{path}' is a training checkpoint, not a model file: resume with mslim_core.checkpoint.load_checkpoint, "
            "or finalize the run and save the model with mslim.save"
        )
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "ema", "module"):
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
        state = obj.get("state_dict", obj.get("model", obj))
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            fresh = _fresh_model(model)
            try:
                fresh.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:4]
                raise CheckpointError(
                    f"'{path}' is a plain state dict (no mslim manifest) that does not fit the given model "
                    f"({'; '.join(lines)[:600]}); a pruned model must be saved with mslim.save to be loadable"
                ) from exc
            return fresh
    raise CheckpointError(
        f"'{path}' holds a {type(obj).__name__}, neither an mslim model file, a module, nor a state dict"
    )


def describe_changes(path: str | Path, model: ModelSource) -> list[Change]:
    """The structural changes an mslim file applies to ``model`` (nothing is loaded or changed)."""
    path = Path(path)
    manifest = read_manifest(path)
    _, changes = rebuild_modules(_fresh_model(model), manifest["modules"], what=f"'{path}'")
    return changes

