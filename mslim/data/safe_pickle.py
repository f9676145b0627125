"""A restricted unpickler for dataset files that hold only numpy arrays and plain containers.

Unpickling runs whatever callables a file names, so a dataset pickle is read with an
allow-list: numpy array/dtype/scalar reconstruction and a few builtin container types.
Anything else is refused with :class:`~mslim_core.errors.DataError` before it is called.
"""

from __future__ import annotations

import builtins
import codecs
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from mslim_core.errors import DataError

__all__ = ["load_numpy_pickle", "loads_numpy_pickle", "RestrictedUnpickler"]


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` that only does what protocol-2 pickles use it for."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(
            f"refused _codecs.encode({type(text).__name__}, {encoding!r}): "
            "only latin1 encoding of a str is allowed in dataset pickles"
        )
    return codecs.encode(text, "latin1")


def _numpy_callables() -> dict[str, Callable[..., Any]]:
    """The numpy reconstruction helpers, found through numpy itself (names move between versions)."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    return {"_reconstruct": reconstruct, "_frombuffer": frombuffer, "scalar": scalar}


_NP = _numpy_callables()

# (module, name) -> object. Module names of numpy 1.x, 2.x and Python 2 pickles alike.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _NP["_reconstruct"]
    _ALLOWED[(_module, "scalar")] = _NP["scalar"]
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_module, "_frombuffer")] = _NP["_frombuffer"]
for _module in ("builtins", "__builtin__"):
    for _name in ("dict", "list", "tuple", "bytes", "bytearray", "str", "int", "float"):
        _ALLOWED[(_module, _name)] = getattr(builtins, _name)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only numpy-array and builtin-container names."""

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed object for ``module.name`` or raise DataError naming it."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refused to unpickle global {module}.{name}: dataset pickles may only hold "
                "numpy arrays, numbers, strings, bytes, lists and dicts"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Persistent ids never occur in dataset files; refuse them."""
        raise DataError("refused a persistent id in a dataset pickle")


def loads_numpy_pickle(data: bytes, *, encoding: str = "bytes", what: str = "pickle") -> Any:
    """Unpickle ``data`` with the allow-list; any failure becomes a DataError naming ``what``."""
    return _load(io.BytesIO(data), encoding=encoding, what=what)


def load_numpy_pickle(path: str | Path, *, encoding: str = "bytes") -> Any:
    """Read one dataset pickle file with the allow-list (``encoding='bytes'`` as for Python 2 files)."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with handle:
        return _load(handle, encoding=encoding, what=str(path))


def _load(handle: BinaryIO, *, encoding: str, what: str) -> Any:
    try:
        return RestrictedUnpickler(handle, encoding=encoding).load()
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError, MemoryError) as exc:
        raise DataError(f"{what}: not a readable pickle of numpy arrays ({type(exc).__name__}: {exc})") from exc
