"""Taylor pruning (Molchanov et al., 2019): accumulate |w * grad| while training, prune in rounds."""

from mslim_taylor.optimizer_sync import follow_removal
from mslim_taylor.pruner import TaylorConfig, TaylorPruner
from mslim_taylor.schedule import RoundSchedule, round_targets

__all__ = ["RoundSchedule", "TaylorConfig", "TaylorPruner", "follow_removal", "round_targets"]
