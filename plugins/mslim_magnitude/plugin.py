"""Hook implementations of the magnitude plugin: registers the ``magnitude`` pruner."""

from __future__ import annotations

from typing import Any, Callable

from mslim_core import hookimpl
from mslim_magnitude.pruner import MagnitudePruner


@hookimpl
def mslim_register_pruners(register: Callable[[Any], None]) -> None:
    """Register ``magnitude``."""
    register(MagnitudePruner)
