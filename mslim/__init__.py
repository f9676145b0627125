"""mslim: structured pruning for PyTorch, where every algorithm is a plugin.

``mslim.prune`` shrinks a model in one call; ``mslim.prepare`` returns a session to drive
from your own training loop.
"""

from mslim import data, models
from mslim.api import AlgorithmInfo, PruneResult, algorithms, plugins, prepare, prune
from mslim.export import export_onnx
from mslim_core import MslimError, PruneReport, PruningSession, __version__
from mslim_core.io import load, save

__all__ = [
    "AlgorithmInfo",
    "MslimError",
    "PruneReport",
    "PruneResult",
    "PruningSession",
    "__version__",
    "algorithms",
    "data",
    "models",
    "export_onnx",
    "load",
    "plugins",
    "prepare",
    "prune",
    "save",
]
