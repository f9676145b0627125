"""One-shot magnitude pruning (Li et al., 2017), generalised to any importance criterion."""

from mslim_magnitude.pruner import MagnitudeConfig, MagnitudePruner

__all__ = ["MagnitudeConfig", "MagnitudePruner"]
