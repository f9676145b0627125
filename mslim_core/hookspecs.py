"""The hook specifications plugins implement: the whole plugin contract of mslim.

Each hook is a registration hook: mslim calls it once per plugin with a ``register``
callable, and the plugin passes the things it provides to it.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT_NAME = "mslim"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def mslim_register_pruners(register: Callable[[type[Any]], None]) -> None:
    """Register pruning algorithms.

    Call ``register(PrunerSubclass)`` once per algorithm. The class needs a unique
    ``name`` and a pydantic ``Config`` (a ``mslim_core.PrunerConfig`` subclass).
    """


@hookspec
def mslim_register_importances(register: Callable[[Any], None]) -> None:
    """Register channel-importance criteria.

    Call ``register(criterion)`` with an ``mslim_core.Importance`` instance; pruners that
    rank channels look criteria up by their ``name`` (``importance="l1"``).
    """


@hookspec
def mslim_register_fusers(register: Callable[[Any], None]) -> None:
    """Register fusion rules.

    Call ``register(rule)`` with an ``mslim_core.fusion.FusionRule``: a pattern of
    consecutive module types and the function that folds them into one module.
    """
