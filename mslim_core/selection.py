"""Channel selection to a FLOPs target: which channels of which units to remove.

Shared by every pruner that ranks channels (magnitude, slimming, Taylor). Given one score
per channel of each prunable unit (higher = more important) and the engine's
``CostModel``, ``select_channels`` picks the channels to remove so that the predicted MACs
are at most ``flops_target`` times the reference MACs. It never touches the model.

Two modes:

- ``"global"``: every unit's scores are normalised (see ``normalize_scores``) and all
  channels of all units are ranked together; the lowest-ranked channels go first, one at a
  time (or one ``round_to`` chunk at a time), each removal updating the MACs through the
  cost model's incremental query in time proportional to the layers the unit touches.
  Removal stops as soon as the target is met.
- ``"uniform"``: every unit keeps the same fraction of its original channels,
  ``floor(original * (1 - ratio))``; the smallest ratio meeting the target is found by
  bisection (each probe one vectorised cost evaluation), then each unit loses its
  lowest-scored channels.

Limits per unit: at least ``min_channels`` kept, at most ``max_ratio_per_layer`` of the
original channels removed, and, with ``round_to = N > 1``, a pruned unit keeps a multiple
of N channels (a unit left untouched keeps its original width). When every unit is at its
limit before the target is met, the result holds the smallest reachable plan, ``reached``
is False and ``reason`` says why.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from mslim_core.config import PrunerConfig
from mslim_core.errors import ConfigError, GraphError

__all__ = [
    "Selection",
    "SelectionConfig",
    "channel_floors",
    "normalize_scores",
    "select_channels",
    "uniform_widths",
]

Mode = Literal["global", "uniform"]
Normalization = Literal["mean", "sum", "max", "none"]
_MODES = ("global", "uniform")
_NORMALIZATIONS = ("mean", "sum", "max", "none")


class SelectionConfig(PrunerConfig):
    """Options every pruner that ranks channels shares: how channels are ranked and per-layer limits."""

    mode: Literal["global", "uniform"] = Field(
        "global",
        description="global: rank all channels of all layers together (scores normalised per layer); "
        "uniform: every layer loses the same fraction of its original channels.",
    )
    normalize: Literal["mean", "sum", "max", "none"] = Field(
        "mean", description="How each layer's scores are scaled before global ranking (mean: divide by their mean)."
    )
    round_to: int = Field(1, ge=1, description="Pruned layers keep a multiple of this many channels (e.g. 8).")
    max_ratio_per_layer: float = Field(
        1.0, gt=0.0, le=1.0, description="At most this fraction of a layer's original channels is removed."
    )
    min_channels: int = Field(1, ge=1, description="Every pruned layer keeps at least this many channels.")
    prune_coupled: bool = Field(
        True, description="Also prune coupled groups (channels tied by residual adds), e.g. ResNet stage widths."
    )

    def selection_options(self) -> dict[str, Any]:
        """The keyword arguments of ``select_channels`` these options set."""
        return {
            "mode": self.mode,
            "normalize": self.normalize,
            "round_to": self.round_to,
            "max_ratio_per_layer": self.max_ratio_per_layer,
            "min_channels": self.min_channels,
        }


@dataclass
class Selection:
    """The channels chosen for removal and the cost they predict."""

    removed: dict[str, torch.Tensor]
    """Unit name -> sorted int64 indices (in the unit's current channel order) to remove; pruned units only."""
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    reference_macs: int
    """The MACs ``flops_target`` is a fraction of (the original model's, by default the cost model's start)."""
    macs_before: int
    macs_after: int
    """MACs predicted by the cost model once the channels are removed."""
    flops_target: float
    mode: str
    reached: bool
    reason: str | None = None
    ratio: float | None = None
    """Uniform mode: the common fraction of channels removed per unit."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flops_ratio(self) -> float:
        """Predicted MACs after removal over the reference MACs."""
        return self.macs_after / self.reference_macs if self.reference_macs else 1.0

    @property
    def num_removed(self) -> int:
        """Total number of channels removed."""
        return sum(int(v.numel()) for v in self.removed.values())

    def keep_indices(self, unit: str) -> torch.Tensor:
        """Sorted indices of the channels that unit ``unit`` keeps."""
        width = self.widths_before[unit]
        mask = torch.ones(width, dtype=torch.bool)
        if unit in self.removed:
            mask[self.removed[unit]] = False
        return mask.nonzero().flatten()


def normalize_scores(scores: torch.Tensor, method: Normalization = "mean") -> torch.Tensor:
    """Scale one unit's scores for ranking across units: divide by their mean, sum or max, or leave them.

    Mean normalisation (the default) makes every unit's scores average 1, so a unit whose
    criterion values are large only because its filters hold more weights (a 3x3 conv with
    many inputs against a 1x1 conv with few) does not escape pruning; ranking then compares
    how weak a channel is relative to its own layer. ``"none"`` ranks raw values.
    """
    if method not in _NORMALIZATIONS:
        raise ConfigError(f"score normalisation {method!r} is unknown; allowed: {', '.join(_NORMALIZATIONS)}")
    s = scores.detach().to(torch.float64).flatten()
    if method == "none" or s.numel() == 0:
        return s
    if method == "mean":
        denom = s.mean()
    elif method == "sum":
        denom = s.sum()
    else:
        denom = s.max()
    denom = denom.abs()  # a negative mean must not flip the order
    if denom <= 1e-30:
        return torch.zeros_like(s) if bool((s == s[0]).all()) else s
    return s / denom if torch.isfinite(denom) else s


def channel_floors(
    original: torch.Tensor,
    current: torch.Tensor,
    *,
    min_channels: int = 1,
    max_ratio_per_layer: float = 1.0,
    round_to: int = 1,
) -> torch.Tensor:
    """The smallest width each unit may be pruned to (never above its current width).

    ``max(min_channels, ceil(original * (1 - max_ratio_per_layer)))``, rounded up to a
    multiple of ``round_to``, capped at the current width (a unit already below its floor,
    or narrower than one ``round_to`` step, is not pruned further).
    """
    _check_limits(min_channels, max_ratio_per_layer, round_to)
    original = torch.as_tensor(original, dtype=torch.int64)
    current = torch.as_tensor(current, dtype=torch.int64)
    floors = []
    for o, c in zip(original.tolist(), current.tolist()):
        f = max(min_channels, math.ceil(o * (1.0 - max_ratio_per_layer) - 1e-9))
        if round_to > 1:
            f = -(-f // round_to) * round_to
        floors.append(min(f, c))
    return torch.tensor(floors, dtype=torch.int64)


def uniform_widths(
    ratio: float, original: torch.Tensor, current: torch.Tensor, floors: torch.Tensor, round_to: int = 1
) -> torch.Tensor:
    """Widths when every unit keeps ``floor(original * (1 - ratio))`` channels (rounded down to
    a multiple of ``round_to``), clamped between its floor and its current width."""
    kept = torch.floor(original.to(torch.float64) * (1.0 - ratio)).to(torch.int64)
    if round_to > 1:
        kept = torch.div(kept, round_to, rounding_mode="floor") * round_to
    return torch.minimum(torch.maximum(kept, floors), current)


def _check_limits(min_channels: int, max_ratio_per_layer: float, round_to: int) -> None:
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ConfigError(f"min_channels = {min_channels!r} is invalid; allowed: an integer >= 1")
    if not 0.0 < float(max_ratio_per_layer) <= 1.0:
        raise ConfigError(f"max_ratio_per_layer = {max_ratio_per_layer!r} is invalid; allowed: 0 < x <= 1")
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to = {round_to!r} is invalid; allowed: an integer >= 1")


def _aligned_scores(cost: Any, scores: Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor]) -> list[torch.Tensor | None]:
    units = list(cost.units)
    if isinstance(scores, Mapping):
        names = {u.name for u in units}
        unknown = sorted(set(scores) - names)
        if unknown:
            raise GraphError(f"scores given for {unknown!r}, which are not units of the cost model")
        return [scores.get(u.name) for u in units]
    scores = list(scores)
    if len(scores) != len(units):
        raise GraphError(f"scores must have one entry per unit of the cost model ({len(units)}), got {len(scores)}")
    return scores


def _unreachable_reason(min_channels: int, max_ratio: float, round_to: int, ratio: float, target: float) -> str:
    return (
        f"FLOPs target {target} not reachable: with every prunable unit at its limit "
        f"(min_channels={min_channels}, max_ratio_per_layer={max_ratio}, round_to={round_to}) the smallest "
        f"reachable MACs ratio is {ratio:.4f}; the rest of the cost sits in layers that cannot be pruned "
        "(ignored layers, outputs, inputs of the first layer) or at those limits"
    )


def select_channels(
    cost: Any,
    scores: Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor],
    flops_target: float,
    *,
    mode: Mode = "global",
    round_to: int = 1,
    max_ratio_per_layer: float = 1.0,
    min_channels: int = 1,
    normalize: Normalization = "mean",
    reference_macs: int | None = None,
    original_widths: torch.Tensor | Sequence[int] | None = None,
) -> Selection:
    """Choose the channels to remove so the predicted MACs are at most ``flops_target * reference_macs``.

    ``scores`` holds one 1-D tensor per unit of ``cost.units`` (higher = more important;
    None, or a unit missing from a mapping, means the unit is not pruned). Widths are read
    from the units now; ``original_widths`` (default: the cost model's starting widths) and
    ``reference_macs`` (default: the cost model's MACs at those widths) anchor the ratio
    limits and the target when a model is pruned in several steps.
    """
    if mode not in _MODES:
        raise ConfigError(f"selection mode {mode!r} is unknown; allowed: {', '.join(_MODES)}")
    if not 0.0 < float(flops_target) <= 1.0:
        raise ConfigError(f"flops_target = {flops_target!r} is invalid; allowed: 0 < x <= 1")
    _check_limits(min_channels, max_ratio_per_layer, round_to)
    units = list(cost.units)
    per_unit = _aligned_scores(cost, scores)
    current = cost.widths()
    original = cost.initial_widths() if original_widths is None else torch.as_tensor(original_widths, dtype=torch.int64)
    if original.shape != current.shape:
        raise GraphError(f"original_widths must have one entry per unit ({len(units)}), got {tuple(original.shape)}")
    for unit, s, width in zip(units, per_unit, current.tolist()):
        if s is None:
            continue
        if s.dim() != 1 or s.numel() != width:
            raise GraphError(
                f"unit {unit.name!r} has {width} channels but its scores have shape {tuple(s.shape)}; "
                "an importance criterion must return one score per output channel"
            )
        if not torch.isfinite(s).all():
            raise GraphError(f"scores of unit {unit.name!r} are not all finite (NaN or inf)")
    floors = channel_floors(
        original, current, min_channels=min_channels, max_ratio_per_layer=max_ratio_per_layer, round_to=round_to
    )
    frozen = torch.tensor([s is None for s in per_unit], dtype=torch.bool)
    floors = torch.where(frozen, current, floors)
    if reference_macs is None:
        reference_macs = int(cost.macs(original))
    macs_now = int(cost.macs(current))
    target_macs = float(flops_target) * reference_macs

    if mode == "global":
        widths, macs_after = _greedy_global(cost, per_unit, current, floors, target_macs, macs_now, round_to, normalize)
        ratio = None
    else:
        widths, macs_after, ratio = _uniform(cost, original, current, floors, target_macs, round_to)

    removed: dict[str, torch.Tensor] = {}
    for ui, (unit, s) in enumerate(zip(units, per_unit)):
        k = int(current[ui] - widths[ui])
        if k <= 0 or s is None:
            continue
        order = _ascending_order(s)
        removed[unit.name] = order[:k].sort().values
    reached = macs_after <= target_macs
    reason = None
    if not reached:
        reason = _unreachable_reason(
            min_channels, max_ratio_per_layer, round_to, macs_after / reference_macs, flops_target
        )
    return Selection(
        removed=removed,
        widths_before={u.name: int(c) for u, c in zip(units, current.tolist())},
        widths_after={u.name: int(w) for u, w in zip(units, widths.tolist())},
        reference_macs=int(reference_macs),
        macs_before=macs_now,
        macs_after=int(macs_after),
        flops_target=float(flops_target),
        mode=mode,
        reached=bool(reached),
        reason=reason,
        ratio=ratio,
    )


def _ascending_order(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices from least to most important; ties keep the lower index first."""
    return torch.sort(scores.detach().to(torch.float64), stable=True).indices


def _next_width(width: int, round_to: int) -> int:
    """The next allowed width below ``width``: one less, or the multiple of ``round_to`` below it."""
    if round_to <= 1:
        return width - 1
    return ((width - 1) // round_to) * round_to


def _greedy_global(
    cost: Any,
    per_unit: list[torch.Tensor | None],
    current: torch.Tensor,
    floors: torch.Tensor,
    target_macs: float,
    macs_now: int,
    round_to: int,
    normalize: Normalization,
) -> tuple[torch.Tensor, int]:
    """Remove the globally lowest-ranked channels (or chunks) until the target is met or nothing is left.

    The units' sorted score lists are merged through a heap keyed by the next chunk's mean
    normalised score, so the order equals one global sort when ``round_to`` is 1.
    """
    widths = current.tolist()
    floor_list = floors.tolist()
    sorted_scores: list[list[float] | None] = []
    for s in per_unit:
        if s is None:
            sorted_scores.append(None)
            continue
        norm = normalize_scores(s, normalize)
        sorted_scores.append(norm[_ascending_order(norm)].tolist())
    removed = [0] * len(widths)
    heap: list[tuple[float, int, int]] = []

    def push(u: int) -> None:
        values = sorted_scores[u]
        if values is None:
            return
        nxt = _next_width(widths[u], round_to)
        if nxt < floor_list[u] or nxt < 0:
            return
        k = widths[u] - nxt
        chunk = values[removed[u] : removed[u] + k]
        heapq.heappush(heap, (sum(chunk) / len(chunk), u, k))

    for u in range(len(widths)):
        push(u)
    total = macs_now
    while total > target_macs and heap:
        _, u, k = heapq.heappop(heap)
        total = cost.macs_after_removing(u, k, list(widths))
        widths[u] -= k
        removed[u] += k
        push(u)
    return torch.tensor(widths, dtype=torch.int64), int(total)


def _uniform(
    cost: Any,
    original: torch.Tensor,
    current: torch.Tensor,
    floors: torch.Tensor,
    target_macs: float,
    round_to: int,
) -> tuple[torch.Tensor, int, float]:
    """Bisection on the common ratio: the smallest one whose widths meet the target."""
    prunable = floors < current

    def widths_at(r: float) -> torch.Tensor:
        w = uniform_widths(r, original, current, floors, round_to)
        return torch.where(prunable, w, current)

    w0 = widths_at(0.0)
    m0 = int(cost.macs(w0))
    if m0 <= target_macs:
        return w0, m0, 0.0
    w1 = widths_at(1.0)
    m1 = int(cost.macs(w1))
    if m1 > target_macs:
        return w1, m1, 1.0
    lo, hi = 0.0, 1.0
    best_w, best_m = w1, m1
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        w = widths_at(mid)
        m = int(cost.macs(w))
        if m <= target_macs:
            hi, best_w, best_m = mid, w, m
        else:
            lo = mid
        if hi - lo < 1e-12:
            break
    return best_w, best_m, hi
