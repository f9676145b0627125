"""mslim_core: the plugin SPI (hook specs, base classes) and the shared pruning engine."""

from mslim_core.config import PrunerConfig
from mslim_core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EquivalenceError,
    GraphError,
    MslimError,
    MslimWarning,
    PluginError,
    TargetNotReachedWarning,
    TrainingError,
    UnknownAlgorithmError,
    UnknownImportanceError,
    UnsafeCheckpointError,
)
from mslim_core.hookspecs import hookimpl, hookspec
from mslim_core.importance import Importance
from mslim_core.pruner import Pruner
from mslim_core.report import PruneReport
from mslim_core.session import PruningSession

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EquivalenceError",
    "GraphError",
    "Importance",
    "MslimError",
    "MslimWarning",
    "PluginError",
    "PruneReport",
    "Pruner",
    "PrunerConfig",
    "PruningSession",
    "TargetNotReachedWarning",
    "TrainingError",
    "UnknownAlgorithmError",
    "UnknownImportanceError",
    "UnsafeCheckpointError",
    "hookimpl",
    "hookspec",
]
