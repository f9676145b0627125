"""Hook implementations of the resrep plugin: registers the ``resrep`` algorithm."""

from __future__ import annotations

from typing import Callable

from mslim_core import hookimpl

from mslim_resrep.pruner import ResRepPruner


@hookimpl
def mslim_register_pruners(register: Callable[[type], None]) -> None:
    """Register ``ResRepPruner`` under the name ``resrep``."""
    register(ResRepPruner)
