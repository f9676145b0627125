"""Hook implementations of the slimming plugin: registers the ``slimming`` pruner."""

from __future__ import annotations

from typing import Any, Callable

from mslim_core import hookimpl
from mslim_slimming.pruner import SlimmingPruner


@hookimpl
def mslim_register_pruners(register: Callable[[Any], None]) -> None:
    """Register ``slimming``."""
    register(SlimmingPruner)
