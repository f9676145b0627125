"""Hook implementations of the taylor plugin: registers the ``taylor`` pruner."""

from __future__ import annotations

from typing import Any, Callable

from mslim_core import hookimpl
from mslim_taylor.pruner import TaylorPruner


@hookimpl
def mslim_register_pruners(register: Callable[[Any], None]) -> None:
    """Register ``taylor``."""
    register(TaylorPruner)
