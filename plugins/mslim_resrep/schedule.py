"""The mask update: which compactor rows get no task gradient, chosen by global row norm under a FLOPs target.

One update (the paper's rule, section 3 of the spec):

1. sort every (layer, channel) row of every compactor by its L2 norm, ascending, globally;
2. walk that list, masking rows one by one, skipping a row whose layer is already down to
   ``num_at_least`` unmasked rows;
3. stop as soon as the MACs with the masked channels removed are at most the target, or when
   ``limit`` rows are masked.

It is computed without a Python loop over channels: the skip rule only depends on a row's rank
within its own layer, so the accepted walk is one vectorised filter of the sorted ids; the MACs
after the first ``k`` accepted rows are monotone in ``k``, so the stopping point is found by a
binary search, each probe one vectorised evaluation of the engine's ``CostModel`` at the widths
those ``k`` rows leave. Row ids stay global (positions in the full sort, never in a filtered
subset).

With ``forced`` rows (proximal zeroing keeps masked rows masked), those rows come first in the walk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["MaskChoice", "accepted_walk", "choose_masked_rows", "growth_limit"]


class MacsModel(Protocol):
    """The part of ``mslim_core.cost.CostModel`` the schedule needs."""

    def macs(self, widths: torch.Tensor | None = None) -> int | torch.Tensor:
        """Total MACs at these unit widths."""
        ...


@dataclass(frozen=True)
class MaskChoice:
    """The result of one mask update."""

    masked: torch.Tensor
    """bool (num_rows,): True for masked rows (global row ids)."""
    num_masked: int
    macs: int
    """MACs of the model with the masked channels removed (cost-model prediction)."""
    target_reached: bool
    needed: int
    """Rows the walk needs to reach the target at the current norms (all acceptable rows if unreachable)."""


def accepted_walk(
    norms: torch.Tensor,
    layer_of_row: torch.Tensor,
    widths: torch.Tensor,
    num_at_least: int,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global row ids in walk order (ascending norm, forced rows first), skipped rows left out.

    Returns (row ids, their layer ids). Ties keep row-id order (stable sort).
    """
    key = norms.detach().to(device="cpu", dtype=torch.float64).clone()
    if forced is not None:
        key[forced.cpu()] = -1.0  # norms are >= 0: forced rows sort first
    order = torch.argsort(key, stable=True)
    layers = layer_of_row[order]
    n_layers = int(widths.numel())
    # rank of each row within its own layer, in walk order
    by_layer = torch.argsort(layers, stable=True)
    counts = torch.bincount(layers, minlength=n_layers)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[by_layer] = torch.arange(order.numel()) - starts[layers[by_layer]]
    allowed = (widths.to(torch.int64) - int(num_at_least)).clamp_min(0)
    accept = rank < allowed[layers]
    return order[accept], layers[accept]


def _widths_after(w0: torch.Tensor, seq_layers: torch.Tensor, k: int) -> torch.Tensor:
    return w0 - torch.bincount(seq_layers[:k], minlength=w0.numel())


def growth_limit(current: int, needed: int, granularity: int, updates_left: int | None) -> int:
    """Most rows that may be masked after this update: ``current + granularity``, or more when a
    planned ramp has ``updates_left`` updates to reach ``needed`` rows."""
    step = granularity
    if updates_left is not None and needed > current:
        step = max(step, math.ceil((needed - current) / max(1, updates_left)))
    return current + step


def choose_masked_rows(
    norms: torch.Tensor,
    layer_of_row: torch.Tensor,
    widths: torch.Tensor,
    cost: MacsModel,
    target_macs: float,
    num_at_least: int,
    current: int,
    granularity: int,
    updates_left: int | None = None,
    forced: torch.Tensor | None = None,
) -> MaskChoice:
    """One mask update: rows to mask, from scratch (or on top of ``forced`` rows).

    ``widths`` are the compactors' row counts, in the cost model's unit order; ``current`` the
    number of rows masked before this update. At most ``growth_limit(...)`` rows are masked.
    """
    w0 = widths.to(torch.int64).cpu()
    seq, seq_layers = accepted_walk(norms, layer_of_row.cpu(), w0, num_at_least, forced)
    # forced rows come first in the walk; count those the skip rule accepted
    n_forced = int(forced.cpu()[seq].sum()) if forced is not None else 0

    def macs_at(k: int) -> int:
        return int(cost.macs(_widths_after(w0, seq_layers, k)))

    # smallest k >= lo with macs_at(k) <= target; macs_at is non-increasing in k
    lo, hi = n_forced, seq.numel()
    if macs_at(hi) > target_macs:
        needed, reached_possible = hi, False
    else:
        reached_possible = True
        while lo < hi:
            mid = (lo + hi) // 2
            if macs_at(mid) <= target_macs:
                hi = mid
            else:
                lo = mid + 1
        needed = lo
    limit = growth_limit(current, needed, granularity, updates_left)
    k = max(n_forced, min(needed, limit))
    masked = torch.zeros(norms.numel(), dtype=torch.bool)
    masked[seq[:k]] = True
    macs = macs_at(k)
    return MaskChoice(
        masked=masked,
        num_masked=k,
        macs=macs,
        target_reached=reached_possible and macs <= target_macs,
        needed=needed,
    )
