"""One-shot magnitude pruning (Li et al., 2017), generalised to any importance criterion."""

from mslim_magnitude.pruner import MagnitudeConfig, MagnitudePruner, prune_by_importance

__all__ = ["MagnitudeConfig", "MagnitudePruner", "prune_by_importance"]
