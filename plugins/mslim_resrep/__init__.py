"""ResRep (Ding et al., ICCV 2021): the reference pruning plugin of mslim.

Compactors (1x1 identity convs) after the BN of each independent conv, trained with masked
group-lasso gradients under a FLOPs-targeted mask schedule, then folded into the convs.
"""

from mslim_resrep.bank import CompactorBank
from mslim_resrep.compactor import Compacted, Compactor
from mslim_resrep.config import ResRepConfig, resolve_schedule
from mslim_resrep.finalize import convert, fold_compactors, rows_to_keep
from mslim_resrep.gradients import reset_gradients
from mslim_resrep.insert import CompactedUnit, insert_compactors, select_units
from mslim_resrep.pruner import COMPACTOR_GROUP, ResRepPruner, set_momentum
from mslim_resrep.schedule import choose_masked_rows

__all__ = [
    "COMPACTOR_GROUP",
    "Compacted",
    "CompactedUnit",
    "Compactor",
    "CompactorBank",
    "ResRepConfig",
    "ResRepPruner",
    "choose_masked_rows",
    "convert",
    "fold_compactors",
    "insert_compactors",
    "reset_gradients",
    "resolve_schedule",
    "rows_to_keep",
    "select_units",
    "set_momentum",
]
