"""Hook implementations of the importance plugin: registers the built-in criteria."""

from __future__ import annotations

from typing import Any, Callable

from mslim_core import hookimpl
from mslim_importance.criteria import (
    BNScaleImportance,
    FPGMImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
    TaylorImportance,
)


@hookimpl
def mslim_register_importances(register: Callable[[Any], None]) -> None:
    """Register l1, l2, bn_scale, taylor, fpgm and random."""
    for criterion in (
        L1Importance(),
        L2Importance(),
        BNScaleImportance(),
        TaylorImportance(),
        FPGMImportance(),
        RandomImportance(seed=0),
    ):
        register(criterion)
