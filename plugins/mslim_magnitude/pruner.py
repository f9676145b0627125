"""``MagnitudePruner``: one-shot pruning to a FLOPs target by any registered importance criterion.

Li et al., "Pruning Filters for Efficient ConvNets" (2017) rank filters by their L1 norm and
remove the weakest; here the ranking criterion is any registered importance (``l1`` by
default), the ranking is global or a uniform per-layer ratio, and the amount removed is
chosen by the engine's cost model to meet ``flops_target``. Residual (coupled) groups are
pruned as one unit. Nothing trains: everything happens in ``finalize``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from mslim_core.importance import get_importance
from mslim_core.oneshot import prune_by_importance
from mslim_core.pruner import Pruner
from mslim_core.selection import SelectionConfig
from mslim_core.report import PruneReport

__all__ = ["MagnitudeConfig", "MagnitudePruner"]


class MagnitudeConfig(SelectionConfig):
    """Options of ``magnitude``: the criterion, how channels are ranked, and per-layer limits."""

    importance: str = Field(
        "l1", description="Name of a registered importance criterion (l1, l2, bn_scale, taylor, fpgm, random, ...)."
    )


class MagnitudePruner(Pruner):
    """One-shot pruning to a FLOPs target, ranking channels by an importance criterion (L1 by default)."""

    name = "magnitude"
    description = "One-shot filter pruning to a FLOPs target by any importance criterion (Li et al., 2017)"
    Config = MagnitudeConfig
    trains = False

    def __init__(self, model: nn.Module, example_inputs: Any, config: MagnitudeConfig) -> None:
        super().__init__(model, example_inputs, config)
        self.criterion = get_importance(config.importance)  # an unknown name fails here, before any work
        self._result: dict[str, Any] = {}

    def finalize(self) -> tuple[nn.Module, PruneReport]:
        """Score every unit, choose channels to meet ``flops_target``, remove them, check, report."""
        model, report = prune_by_importance(
            self,
            self.criterion,
        )
        self._result = {
            "finalized": True,
            "removals": report.extra["removals"],
            "removed_channels": report.extra["removed_channels"],
        }
        return model, report

    def state_dict(self) -> dict[str, Any]:
        """Nothing to resume before ``finalize``; afterwards the removal record (plain lists)."""
        return dict(self._result)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self._result = dict(state)
