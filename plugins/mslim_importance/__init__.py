"""Channel-importance criteria (L1, L2, BN scale, Taylor, FPGM, random) as an mslim plugin."""

from mslim_importance.criteria import (
    BNScaleImportance,
    FPGMImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
    TaylorImportance,
)

__all__ = [
    "BNScaleImportance",
    "FPGMImportance",
    "L1Importance",
    "L2Importance",
    "RandomImportance",
    "TaylorImportance",
]
