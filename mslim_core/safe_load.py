"""Read ``torch.save`` files without running pickled code, and say why a file is refused.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers. A file that
needs more (a whole pickled ``nn.Module``, or a crafted payload) is refused with
``UnsafeCheckpointError`` naming the Python objects it would import; a damaged file
gets a ``CheckpointError``. ``trust=True`` is the explicit escape hatch for files the
user made.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from mslim_core.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["pickle_globals", "safe_torch_load", "unsafe_globals", "unsafe_message"]

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                         "BINSTRING", "SHORT_BINSTRING"})
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError,
                  KeyError, IndexError, OSError, ImportError, zipfile.BadZipFile, UnicodeDecodeError)


def _scan_one(stream: IO[bytes], found: list[str]) -> None:
    """Add the globals one pickle (up to its STOP) imports to ``found``; never executes anything."""
    recent: list[Any] = []
    memo: dict[int, Any] = {}
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name == "GLOBAL" or name == "INST":
            found.append(str(arg).replace(" ", "."))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (recent[-2:] + [None, None])[:2] if len(recent) >= 2 else (None, None)
            found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
            recent.append(None)
        elif name in _STRING_OPS:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(arg)))
        elif name not in ("FRAME", "PROTO"):
            recent.append(None)
        del recent[:-8]


def pickle_globals(data: bytes, max_pickles: int = 8) -> list[str]:
    """Every ``module.name`` the pickled data would import, read statically (best effort on damaged data).

    A legacy ``torch.save`` file is several pickles in a row; up to ``max_pickles`` are read.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        if stream.tell() >= len(data):
            break
        try:
            _scan_one(stream, found)
        except Exception:  # damaged or not a pickle: report what was read so far
            break
    return list(dict.fromkeys(found))


def _allowed_globals() -> set[str] | None:
    """What ``weights_only`` loading accepts, or None when torch no longer exposes the list."""
    try:
        from torch import _weights_only_unpickler as wou

        return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    except Exception:
        return None


def _is_allowed(name: str, allowed: set[str] | None) -> bool:
    if allowed is not None:
        return name in allowed
    # fallback: torch's storage/dtype/rebuild helpers are fine, modules and everything else are not
    return name == "collections.OrderedDict" or (name.startswith("torch.") and not name.startswith("torch.nn."))


def unsafe_globals(data: bytes) -> list[str]:
    """The globals of a ``torch.save`` payload (zip or legacy pickle) that ``weights_only`` refuses."""
    pickles: list[bytes] = []
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                pickles = [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
        except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError):
            pickles = []
    else:
        pickles = [data]
    allowed = _allowed_globals()
    found = [g for blob in pickles for g in pickle_globals(blob)]
    return [g for g in dict.fromkeys(found) if not _is_allowed(g, allowed)]


def unsafe_message(what: str, names: list[str]) -> str:
    """Why a file is refused and the two ways forward."""
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (
        f"{what} is a pickled checkpoint that imports Python objects ({shown}) to load: unpickling it "
        "can run arbitrary code chosen by whoever wrote the file, so mslim refuses it. To convert it, "
        "load it yourself in a trusted environment (torch.load(path, weights_only=False)) and write it "
        "again with mslim.save(model, 'model.mslim'); or, only for a file you made yourself, pass "
        "trust=True (CLI: --trust)."
    )


def safe_torch_load(
    source: str | Path | bytes,
    *,
    what: str | None = None,
    map_location: Any = "cpu",
    trust: bool = False,
) -> Any:
    """``torch.load`` with ``weights_only=True`` (or, with ``trust=True``, full unpickling).

    Refused payloads raise UnsafeCheckpointError (naming the globals); damaged ones CheckpointError.
    """
    if isinstance(source, (str, Path)):
        label = what or f"'{source}'"
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{label}: no such file") from None
        except OSError as exc:
            raise CheckpointError(f"{label}: cannot be read ({exc})") from exc
    else:
        label = what or "the data"
        data = bytes(source)
    if not data:
        raise CheckpointError(f"{label} is empty (0 bytes): the write that made it was interrupted")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=not trust)
    except _PICKLE_ERRORS as exc:
        if not trust:
            names = unsafe_globals(data)
            if names:
                raise UnsafeCheckpointError(unsafe_message(label, names)) from None
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in detail:
            detail = "its pickled data ends early or is damaged"
        raise CheckpointError(
            f"{label} is truncated or corrupted and cannot be read ({detail}); restore it from a "
            "good copy or write it again"
        ) from exc
