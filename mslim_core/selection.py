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

Tied channels: a unit whose channels feed a grouped conv, or pass a ``chunk(n)``, can only
lose whole *channel sets* (``channel_sets``: the tie classes of the grouped convs, or one
channel from each chunk). ``select_channels`` ranks such a unit's sets by the mean of their
members' normalised scores and changes its width only by whole sets.
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
    "channel_sets",
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
    return _aligned(cost, scores, "scores")


def _aligned(cost: Any, per_unit: Sequence[Any] | Mapping[str, Any], what: str) -> list[Any]:
    """``per_unit`` (a mapping by unit name, or a sequence in ``cost.units`` order) as a list in unit order."""
    units = list(cost.units)
    if isinstance(per_unit, Mapping):
        names = {u.name for u in units}
        unknown = sorted(set(per_unit) - names)
        if unknown:
            raise GraphError(f"{what} given for {unknown!r}, which are not units of the cost model")
        return [per_unit.get(u.name) for u in units]
    per_unit = list(per_unit)
    if len(per_unit) != len(units):
        raise GraphError(f"{what} must have one entry per unit of the cost model ({len(units)}), got {len(per_unit)}")
    return per_unit


def channel_sets(graph: Any, unit: Any, scores: torch.Tensor | None = None) -> torch.Tensor | None:
    """The channel sets a removal from ``unit`` must take whole: a (num_sets, set_size) int64 tensor
    of current channel indices, or None for a unit whose channels are not tied.

    Grouped convs: the tie classes (``ChannelGraph.tie_classes``). ``chunk(n)``: each of the n
    equal chunks is sorted by ``scores`` ascending (stable; by position without scores) and set i
    holds the i-th weakest channel of every chunk, so removing k sets removes the k weakest of
    each chunk. A unit with both raises GraphError (not supported).
    """
    u = graph.unit(unit) if isinstance(unit, str) else unit
    tied, chunked = int(u.channel_groups) > 1, int(u.chunks) > 1
    if not tied and not chunked:
        return None
    if tied and chunked:
        raise GraphError(
            f"unit {u.name!r}: its channels are tied by grouped convs (classes of {u.channel_groups}) and also "
            f"pass a chunk({u.chunks}); removing channel sets that satisfy both is not supported"
        )
    if tied:
        return graph.tie_classes(u)
    blocks = _chunk_blocks(graph, u)  # (chunks, m)
    if scores is None:
        return blocks.t().contiguous()
    s = torch.as_tensor(scores).detach().flatten().to(torch.float64).cpu()
    if s.numel() != int(u.channels):
        raise GraphError(f"unit {u.name!r} has {u.channels} channels but {s.numel()} scores were given")
    order = torch.sort(s[blocks], dim=1, stable=True).indices
    return torch.gather(blocks, 1, order).t().contiguous()


def _chunk_blocks(graph: Any, unit: Any) -> torch.Tensor:
    """(num_blocks, block_size) current channels of a chunked unit: those in the same chunk of every
    ``chunk()`` the unit passes; GraphError when they do not split it into equal blocks."""
    labellings = tuple(getattr(unit, "_chunk_labels", ()))
    if len(labellings) > 1:  # several chunk() calls: blocks are the channels sharing every chunk number
        orig = graph.original_indices(unit)
        joint = torch.zeros(int(unit.channels), dtype=torch.int64)
        outside = torch.zeros(int(unit.channels), dtype=torch.bool)
        for labels in labellings:
            current = labels[orig]
            outside |= current < 0
            joint = joint * (int(labels.max()) + 1) + current.clamp(min=0)
        _, inverse = torch.unique(joint, return_inverse=True)
        blocks = [] if bool(outside.any()) else [torch.nonzero(inverse == k).flatten() for k in range(int(inverse.max()) + 1)]
    else:
        blocks = graph.channel_blocks(unit)
    sizes = [int(b.numel()) for b in blocks]
    if not sizes or sum(sizes) != int(unit.channels) or min(sizes) != max(sizes) or min(sizes) == 0:
        raise GraphError(
            f"unit {unit.name!r}: its channels pass a chunk({unit.chunks}) that does not split all {unit.channels} "
            f"of them into equal chunks (chunk sizes {sizes}); removing channel sets there is not supported"
        )
    return torch.stack([b.to(torch.int64) for b in blocks])


def _checked_sets(name: str, sets: Any, width: int) -> torch.Tensor:
    """``sets`` as a (num_sets, set_size) int64 tensor that partitions ``width`` channels, or GraphError."""
    if not isinstance(sets, torch.Tensor) or sets.dim() != 2 or sets.dtype.is_floating_point or sets.dtype == torch.bool:
        shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
        raise GraphError(
            f"channel sets of unit {name!r} must be a 2-D integer tensor (num_sets, set_size), got {shape}"
        )
    sets = sets.detach().to(torch.int64).cpu()
    if sets.shape[1] == 0 or sets.numel() != width or not torch.equal(sets.flatten().sort().values, torch.arange(width)):
        raise GraphError(
            f"channel sets of unit {name!r} (shape {tuple(sets.shape)}) must partition its {width} channels: "
            f"every index 0..{width - 1} exactly once, in equal-size sets"
        )
    return sets


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
    channel_sets: Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor] | None = None,
) -> Selection:
    """Choose the channels to remove so the predicted MACs are at most ``flops_target * reference_macs``.

    ``scores`` holds one 1-D tensor per unit of ``cost.units`` (higher = more important;
    None, or a unit missing from a mapping, means the unit is not pruned). Widths are read
    from the units now; ``original_widths`` (default: the cost model's starting widths) and
    ``reference_macs`` (default: the cost model's MACs at those widths) anchor the ratio
    limits and the target when a model is pruned in several steps.

    ``channel_sets`` (per unit, as from the function ``channel_sets``; None for a plain unit)
    makes a unit lose only whole sets: its sets are ranked by the mean of their members'
    normalised scores, and its width moves by multiples of the set size (landing on a
    multiple of ``round_to`` when that is above 1); uniform mode snaps its width up to the
    nearest such width. Units without sets behave as without the argument.
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
    per_unit_sets: list[torch.Tensor | None] = [None] * len(units)
    if channel_sets is not None:
        per_unit_sets = [
            None if sets is None or s is None else _checked_sets(unit.name, sets, width)
            for unit, s, sets, width in zip(units, per_unit, _aligned(cost, channel_sets, "channel_sets"), current.tolist())
        ]
    set_sizes = [1 if sets is None else int(sets.shape[1]) for sets in per_unit_sets]
    steps = [math.lcm(z, round_to) if z > 1 else round_to for z in set_sizes]
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
        ranked = [
            None if s is None else _ranked_values(s, sets, normalize) for s, sets in zip(per_unit, per_unit_sets)
        ]
        widths, macs_after = _greedy_global(cost, ranked, current, floors, target_macs, macs_now, steps)
        ratio = None
    else:
        snap = torch.tensor([z > 1 for z in set_sizes], dtype=torch.bool)
        step_t = torch.tensor(steps, dtype=torch.int64)
        widths, macs_after, ratio = _uniform(cost, original, current, floors, target_macs, round_to, snap, step_t)

    removed: dict[str, torch.Tensor] = {}
    for ui, (unit, s, sets) in enumerate(zip(units, per_unit, per_unit_sets)):
        k = int(current[ui] - widths[ui])
        if k <= 0 or s is None:
            continue
        if sets is not None and k % set_sizes[ui]:
            raise GraphError(f"internal error: unit {unit.name!r} would lose {k} channels, not whole sets of {set_sizes[ui]}")
        order = _ascending_order(s) if sets is None else _set_order(s, sets, normalize).flatten()
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
        extra={"set_sizes": {u.name: z for u, z in zip(units, set_sizes) if z > 1}},
    )


def _set_order(scores: torch.Tensor, sets: torch.Tensor, normalize: Normalization) -> torch.Tensor:
    """The rows of ``sets`` from weakest to strongest by the mean of their members' normalised scores."""
    means = normalize_scores(scores, normalize)[sets].mean(1)
    return sets[torch.sort(means, stable=True).indices]


def _ranked_values(scores: torch.Tensor, sets: torch.Tensor | None, normalize: Normalization) -> list[float]:
    """Per channel, in removal order, the normalised score global ranking compares: the channel's own,
    or its set's mean (repeated for each member, so any whole number of sets averages right)."""
    norm = normalize_scores(scores, normalize)
    if sets is None:
        return norm[_ascending_order(norm)].tolist()
    means = torch.sort(norm[sets].mean(1), stable=True).values
    return means.repeat_interleave(sets.shape[1]).tolist()


def _ascending_order(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices from least to most important; ties keep the lower index first."""
    return torch.sort(scores.detach().to(torch.float64), stable=True).indices


def _next_width(width: int, step: int) -> int:
    """The next allowed width below ``width``: one less, or the multiple of ``step`` below it.

    ``step`` is ``round_to`` for a plain unit and ``lcm(set_size, round_to)`` for a unit with
    channel sets (its width is a multiple of the set size, so every move removes whole sets).
    """
    if step <= 1:
        return width - 1
    return ((width - 1) // step) * step


def _greedy_global(
    cost: Any,
    ranked: list[list[float] | None],
    current: torch.Tensor,
    floors: torch.Tensor,
    target_macs: float,
    macs_now: int,
    steps: list[int],
) -> tuple[torch.Tensor, int]:
    """Remove the globally lowest-ranked channels (or chunks) until the target is met or nothing is left.

    ``ranked[u]``: unit u's normalised scores in removal order (None: not pruned). The units'
    lists are merged through a heap keyed by the next chunk's mean normalised score, so the
    order equals one global sort when every step is 1.
    """
    widths = current.tolist()
    floor_list = floors.tolist()
    removed = [0] * len(widths)
    heap: list[tuple[float, int, int]] = []

    def push(u: int) -> None:
        values = ranked[u]
        if values is None:
            return
        nxt = _next_width(widths[u], steps[u])
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
    snap: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, int, float]:
    """Bisection on the common ratio: the smallest one whose widths meet the target.

    Units flagged in ``snap`` (those with channel sets) have their width rounded up to a
    multiple of their ``steps`` entry, never above the current width.
    """
    prunable = floors < current

    def widths_at(r: float) -> torch.Tensor:
        w = uniform_widths(r, original, current, floors, round_to)
        snapped = torch.minimum(-torch.div(-w, steps, rounding_mode="floor") * steps, current)
        w = torch.where(snap, snapped, w)
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
