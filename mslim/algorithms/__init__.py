"""Compatibility names for code written against the seed toolkit's layout (``mslim.algorithms.pytorch.prune``).

Each module here is a thin layer over ``mslim.prepare``; no algorithm is implemented twice.

Importing this package makes it the attribute ``mslim.algorithms``, where the function listing
the algorithms lives; the package is therefore callable and does what that function does, so
``mslim.algorithms()`` keeps working once the seed's import path has been used.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from mslim.api import algorithms as _list_algorithms


class _CallablePackage(types.ModuleType):
    """A package that, called, lists the installed algorithms (as ``mslim.algorithms()`` does)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The installed algorithms (``mslim.api.algorithms``)."""
        return _list_algorithms(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
