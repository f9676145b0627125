"""Exception and warning types raised by mslim and its plugins.

Every error a user can cause is an ``MslimError`` subclass whose message names the bad
value and what would be accepted instead.
"""

from __future__ import annotations


class MslimError(Exception):
    """Base class of every error mslim raises on purpose."""


class PluginError(MslimError):
    """A plugin failed to load, or registered something invalid or duplicated."""


class UnknownAlgorithmError(MslimError):
    """``algo=`` names no registered pruner."""


class UnknownImportanceError(MslimError):
    """``importance=`` names no registered importance criterion."""


class ConfigError(MslimError):
    """An option or a recipe file does not validate against the algorithm's config."""


class GraphError(MslimError):
    """The model cannot be analysed or changed safely (unsupported op, bad example input)."""


class EquivalenceError(GraphError):
    """A pruned model no longer matches the original with the same channels zeroed."""


class CheckpointError(MslimError):
    """A saved file is missing, truncated, unsafe, or does not match the given model."""


class UnsafeCheckpointError(CheckpointError):
    """A file would need unpickling of arbitrary Python objects to load."""


class DataError(MslimError):
    """A dataset path is missing or not in the expected format."""


class TrainingError(MslimError):
    """Training cannot go on (for example, non-finite gradients)."""


class MslimWarning(UserWarning):
    """Base class of warnings mslim issues."""


class TargetNotReachedWarning(MslimWarning):
    """The achieved FLOPs ratio is above the requested ``flops_target``."""


class UnsupportedOpWarning(MslimWarning):
    """Some layers cannot be pruned because their channels pass through an op that moves channels."""
