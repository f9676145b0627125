"""The built-in channel-importance criteria: L1, L2, BN scale, Taylor, FPGM and random.

Every score is "higher = more important". Formulas are in ``docs/importance.md``.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor, nn

from mslim_core.errors import ConfigError, GraphError
from mslim_core.importance import (
    NORM_ROLES,
    Importance,
    accumulated_taylor,
    filter_rows,
    filter_rows_of,
)

__all__ = ["BNScaleImportance", "FPGMImportance", "L1Importance", "L2Importance", "RandomImportance", "TaylorImportance"]


class L1Importance(Importance):
    """L1 norm of each filter: ``sum |W[c]|`` (Li et al., 2017)."""

    name = "l1"
    description = "L1 norm of each output filter of the producing layer(s)"

    def layer_scores(self, module: nn.Module, name: str) -> Tensor:
        """``sum |w|`` over every weight that produces each output channel."""
        return filter_rows(module).abs().sum(1)


class L2Importance(Importance):
    """L2 norm of each filter: ``sqrt(sum W[c]^2)``."""

    name = "l2"
    description = "L2 norm of each output filter of the producing layer(s)"

    def layer_scores(self, module: nn.Module, name: str) -> Tensor:
        """``sqrt(sum w^2)`` over every weight that produces each output channel."""
        return filter_rows(module).double().norm(p=2, dim=1)


class BNScaleImportance(Importance):
    """Absolute BN scale ``|gamma|`` of the norm layer(s) on the unit's channels (network slimming)."""

    name = "bn_scale"
    description = "|gamma| of the norm layer(s) applied to the channels (network slimming)"
    roles = NORM_ROLES

    def member_names(self, unit: Any) -> list[str]:
        """The unit's norm layers with a per-channel scale; the one right after the root first."""
        names = super().member_names(unit)
        if unit.norm_name and unit.norm_name in names:
            names.remove(unit.norm_name)
            names.insert(0, unit.norm_name)
        return names

    def applicable(self, unit: Any, model: nn.Module) -> bool:
        """True when a norm layer with a per-channel scale acts on the unit's channels."""
        return any(_has_scale(model, n) for n in self.member_names(unit))

    def scores(self, graph: Any, unit: Any, model: nn.Module) -> Tensor:
        """``|gamma|`` per channel, combined over the group's norms; an error names a unit without one."""
        names = [n for n in self.member_names(unit) if _has_scale(model, n)]
        if not names:
            raise GraphError(
                f"importance 'bn_scale' needs a norm layer with a learnable scale (e.g. BatchNorm with "
                f"affine=True) on the channels of unit {unit.name!r}, which has none; pick another "
                "importance or add the layer to ignored_layers"
            )
        return self.combine_members(graph, unit, model, names)

    def layer_scores(self, module: nn.Module, name: str) -> Tensor:
        """``|gamma|`` of one norm layer."""
        return module.weight.detach().abs()


def _has_scale(model: nn.Module, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 1


class TaylorImportance(Importance):
    """First-order Taylor: ``sum |w * dL/dw|`` per filter, summed over the accumulated batches."""

    name = "taylor"
    description = "first-order Taylor |w * grad| per filter, accumulated over batches (Molchanov et al., 2019)"
    needs_gradients = True

    def layer_scores(self, module: nn.Module, name: str) -> Tensor:
        """Sums from a TaylorAccumulator, else this step's ``|w * grad|``; an error when neither exists."""
        acc = accumulated_taylor(module)
        if acc is not None:
            return acc
        grad = getattr(module.weight, "grad", None)
        if grad is None:
            raise ConfigError(
                f"importance 'taylor' needs gradients, but layer {name!r} has neither accumulated Taylor scores "
                "nor a .grad: use algo='taylor' (which accumulates them while training), call "
                "mslim_core.importance.TaylorAccumulator.accumulate() after loss.backward(), or run "
                "loss.backward() on the model before pruning"
            )
        return filter_rows_of(module, (module.weight.detach() * grad).abs()).sum(1)


class FPGMImportance(Importance):
    """Filter pruning via the geometric median: ``sum_j ||W[c] - W[j]||_2`` over the layer's filters.

    A filter close to all others (near the geometric median) is replaceable, so small = redundant.
    """

    name = "fpgm"
    description = "sum of L2 distances of each filter to the layer's other filters (He et al., 2019)"

    def layer_scores(self, module: nn.Module, name: str) -> Tensor:
        """Row sums of the pairwise distance matrix of the layer's filters."""
        rows = filter_rows(module).float()
        return torch.cdist(rows.unsqueeze(0), rows.unsqueeze(0)).squeeze(0).double().sum(1)


class RandomImportance(Importance):
    """Uniform random scores, reproducible: the seed and the unit's name fix them (for ablations)."""

    name = "random"
    description = "uniform random scores, seeded per unit (baseline for ablations)"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def scores(self, graph: Any, unit: Any, model: nn.Module) -> Tensor:
        """``U(0, 1)`` per channel from a generator seeded with ``seed`` and the unit's name."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(unit.name.encode())) % (2**63))
        return torch.rand(int(unit.channels), generator=gen)
