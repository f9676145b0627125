"""Network slimming (Liu et al., 2017): L1 on BN scales while training, prune by |gamma|."""

from mslim_slimming.pruner import SlimmingConfig, SlimmingPruner, penalised_norms

__all__ = ["SlimmingConfig", "SlimmingPruner", "penalised_norms"]
