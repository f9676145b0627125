"""Channel-importance criteria: the base class plugin authors subclass, and the group reduction.

A criterion gives one score per output channel of a unit of the ``ChannelGraph``; higher
means more important (kept longer). Criteria are registered by plugins through the
``mslim_register_importances`` hook and looked up by name (``get_importance("l1")``).

Most criteria score each layer of a unit on its own (``layer_scores``: for instance the L1
norm of every filter of a conv). A *coupled* unit has several such layers (residual adds
tie the output channels of several convs), so the base class maps every member's scores
onto the unit's channels and combines them with :func:`reduce_group`.

Criteria that read gradients (``needs_gradients = True``) get them from
:class:`TaylorAccumulator`, which sums ``|w * dL/dw|`` per output channel over training
steps, or from the weights' current ``.grad`` when nothing was accumulated.
"""

from __future__ import annotations

import difflib
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mslim_core.errors import ConfigError, GraphError, MslimWarning, UnknownImportanceError

__all__ = [
    "Importance",
    "TaylorAccumulator",
    "accumulated_taylor",
    "available_importances",
    "filter_rows",
    "filter_rows_of",
    "get_importance",
    "member_channels",
    "reduce_group",
    "score_units",
    "zero_score_message",
    "zero_scored_units",
]

PRODUCER_ROLES: frozenset[str] = frozenset({"producer"})
NORM_ROLES: frozenset[str] = frozenset({"norm"})


def reduce_group(member_scores: Sequence[Tensor], eps: float = 1e-12) -> Tensor:
    """Combine the scores several layers give the same channels: mean of scores normalised per layer.

    Each member's scores are divided by their own mean, the normalised scores are averaged
    over members, and the result is multiplied by the average of the members' means, so it
    stays in the criterion's units (a single member is returned unchanged). NaN marks a
    channel a member does not see; such entries are left out of both means.

    Why normalise per member: the layers of a coupled group differ in scale (a 1x1 shortcut
    conv has 9x fewer weights per filter than a 3x3 conv; BN scales differ per layer), so a
    raw sum or mean would let the largest-scale layer decide alone. After normalisation every
    member has the same say, and the ranking inside the group no longer depends on layer
    shapes. The mean (rather than the sum) keeps the result independent of the channel count.
    A member whose scores are all zero carries no information and is left out.
    """
    members = [torch.as_tensor(s).detach().flatten().to(torch.float64) for s in member_scores]
    if not members:
        raise GraphError("reduce_group needs at least one member's scores")
    n = members[0].numel()
    if any(m.numel() != n for m in members):
        raise GraphError(f"reduce_group: members score different channel counts {[m.numel() for m in members]}")
    first = torch.as_tensor(member_scores[0])
    dtype = first.dtype if first.is_floating_point() else torch.float32
    if len(members) == 1:
        return first.detach().flatten().to(dtype).clone()
    stacked = torch.stack(members)  # (members, channels)
    seen = ~torch.isnan(stacked)
    means = torch.where(seen, stacked, torch.zeros_like(stacked)).sum(1) / seen.sum(1).clamp(min=1)
    informative = (means.abs() > eps) & seen.any(1)
    if not bool(informative.any()):
        # nothing to normalise by: every member is zero; the channels tie at zero
        covered = seen.any(0)
        return torch.where(covered, stacked.new_zeros(n), stacked.new_full((n,), float("nan"))).to(dtype)
    normalised = stacked[informative] / means[informative, None]
    seen_inf = seen[informative]
    count = seen_inf.sum(0)
    total = torch.where(seen_inf, normalised, torch.zeros_like(normalised)).sum(0)
    mean_norm = total / count.clamp(min=1)
    scale = means[informative].mean()
    out = torch.where(count > 0, mean_norm * scale, torch.full_like(mean_norm, float("nan")))
    zero_only = (count == 0) & seen.any(0)
    out = torch.where(zero_only, torch.zeros_like(out), out)
    return out.to(dtype)


def filter_rows(module: nn.Module) -> Tensor:
    """The weight of a conv or linear layer as (output channels, weights per filter), detached.

    Transposed convs store ``(in, out / groups, *kernel)``; their filters are regrouped so
    row ``o`` holds every weight that produces output channel ``o``.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise GraphError(f"{type(module).__name__} has no weight tensor to score")
    return filter_rows_of(module, weight.detach())


def member_channels(
    graph: Any, unit: Any, member_name: str, kept: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(unit channels, member channels), both in current indexing, that correspond one to one.

    Uses the unit's member records and the graph's surviving channels, so it stays right
    after earlier removals. Without a graph (or member records) the member's channels are
    taken to be the unit's, in order.
    """
    members = [m for m in getattr(unit, "members", ()) if m.name == member_name]
    if graph is None or not members or not hasattr(graph, "kept_channels"):
        idx = torch.arange(int(unit.channels))
        return idx, idx
    if kept is None:
        kept = graph.kept_channels()
    unit_orig = kept.get(unit.name)
    member_orig = kept.get(member_name)
    member = members[0]
    if unit_orig is None or member_orig is None:
        return member.unit_idx.clone(), member.idx.clone()
    pos_u = _positions(unit_orig, member.unit_idx)
    pos_m = _positions(member_orig, member.idx)
    cu = pos_u[member.unit_idx]
    cm = pos_m[member.idx]
    alive = (cu >= 0) & (cm >= 0)
    return cu[alive], cm[alive]


def _positions(kept: Tensor, wanted: Tensor) -> Tensor:
    """Current position of each build-time index in ``kept`` (-1 where removed), sized for ``wanted``."""
    size = max(int(kept.max()) if kept.numel() else -1, int(wanted.max()) if wanted.numel() else -1) + 1
    pos = torch.full((size,), -1, dtype=torch.long)
    pos[kept] = torch.arange(kept.numel())
    return pos


class Importance:
    """Base class of channel-importance criteria; higher scores mean more important channels.

    Subclass and set ``name`` (how users select it: ``importance="name"``) and
    ``description``, then either implement ``layer_scores(module, name)`` (one score per
    output channel of one layer; the base class maps every member layer of the unit onto
    the unit's channels and combines them with :func:`reduce_group`) or override
    ``scores(graph, unit, model)`` entirely. ``roles`` chooses the members scored:
    ``{"producer"}`` (convs/linears whose outputs are the unit's channels) or ``{"norm"}``.
    Set ``needs_gradients = True`` when scores read gradients, so pruners know to collect them,
    and override ``applicable`` when some units cannot be scored.
    """

    name: str = ""
    description: str = ""
    needs_gradients: bool = False
    roles: frozenset[str] = PRODUCER_ROLES

    def applicable(self, unit: Any, model: nn.Module) -> bool:
        """Whether this criterion can score ``unit`` at all (e.g. bn_scale needs a norm layer).

        Pruners skip (and report) units for which this is False; ``scores`` on such a unit raises.
        """
        return True

    def layer_scores(self, module: nn.Module, name: str) -> Tensor:
        """One score per output channel of one layer of a unit (override this, or ``scores``)."""
        raise NotImplementedError(f"importance {self.name!r} implements neither layer_scores() nor scores()")

    def member_names(self, unit: Any) -> list[str]:
        """Names of the unit's layers this criterion scores (``roles``), root producer first."""
        members = getattr(unit, "members", ())
        if members:
            seen: list[str] = []
            for m in members:
                if m.role in self.roles and m.name not in seen:
                    seen.append(m.name)
            if "producer" in self.roles and unit.name in seen:
                seen.remove(unit.name)
                seen.insert(0, unit.name)
            return seen
        names: list[str] = []
        if "producer" in self.roles:
            names.extend(unit.producers)
        if "norm" in self.roles:
            names.extend(unit.norms or ([unit.norm_name] if unit.norm_name else []))
        return names

    def scores(self, graph: Any, unit: Any, model: nn.Module) -> Tensor:
        """One score per current output channel of ``unit`` (a 1-D float tensor)."""
        return self.combine_members(graph, unit, model, self.member_names(unit))

    def combine_members(self, graph: Any, unit: Any, model: nn.Module, names: Sequence[str]) -> Tensor:
        """``layer_scores`` of the named member layers, mapped onto the unit's channels and reduced."""
        if not names:
            raise GraphError(
                f"importance {self.name!r} found no layer to score in unit {unit.name!r} "
                f"(it scores {', '.join(sorted(self.roles))} layers)"
            )
        kept = graph.kept_channels() if graph is not None and hasattr(graph, "kept_channels") else None
        per_member: list[Tensor] = []
        n = int(unit.channels)
        for name in names:
            module = _submodule(model, name)
            raw = self.layer_scores(module, name).detach().flatten().to(torch.float64)
            cu, cm = member_channels(graph, unit, name, kept)
            if cm.numel() and int(cm.max()) >= raw.numel():
                raise GraphError(
                    f"importance {self.name!r} gave {raw.numel()} scores for layer {name!r}, which has more "
                    f"channels in unit {unit.name!r}; layer_scores must return one score per output channel"
                )
            full = torch.full((n,), float("nan"), dtype=torch.float64, device=raw.device)
            full[cu.to(raw.device)] = raw[cm.to(raw.device)]
            per_member.append(full)
        out = reduce_group(per_member)
        if bool(torch.isnan(out).any()):
            missing = torch.isnan(out).nonzero().flatten().tolist()
            raise GraphError(f"importance {self.name!r} could not score channels {missing[:10]} of unit {unit.name!r}")
        return out.to(torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise GraphError(f"the model has no layer named {name!r}; score the model the graph was built on") from exc


def available_importances() -> list[str]:
    """Names of every registered importance criterion, sorted."""
    from mslim_core.plugins import get_registry

    return sorted(get_registry().importances)


def get_importance(name: str | Importance) -> Importance:
    """The registered criterion called ``name`` (an Importance object is returned as is).

    An unknown name raises UnknownImportanceError listing the available ones and the closest match.
    """
    if not isinstance(name, str):
        if callable(getattr(name, "scores", None)):
            return name  # type: ignore[return-value]
        raise UnknownImportanceError(f"importance must be a criterion name or object, got {type(name).__name__}")
    from mslim_core.plugins import get_registry

    registry = get_registry().importances
    if name in registry:
        return registry[name]
    available = sorted(registry)
    close = difflib.get_close_matches(name, available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownImportanceError(
        f"unknown importance {name!r}.{hint} Available: {', '.join(available) or '(none: no plugin loaded)'}."
    )


def zero_scored_units(scores: Mapping[str, Tensor]) -> list[str]:
    """Names of the units whose every channel scored exactly zero (their ranking carries no information)."""
    return [name for name, s in scores.items() if s.numel() and not bool(s.ne(0).any())]


def zero_score_message(criterion_name: str, names: Sequence[str]) -> str:
    """The warning text for units that scored zero everywhere."""
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"importance {criterion_name!r}: every channel of {len(names)} unit(s) scored zero ({shown}): "
        "ties broken by channel index, so the choice of channels there carries no information"
    )


def score_units(importance: Importance, graph: Any, model: nn.Module, units: Iterable[Any]) -> dict[str, Tensor]:
    """Scores of every unit by one criterion, checked: one finite score per channel, on the CPU.

    Units whose scores are all zero get a ``MslimWarning`` ("... scored zero: ties broken by
    channel index"), since removing channels there is then an arbitrary choice.
    """
    out: dict[str, Tensor] = {}
    for unit in units:
        s = importance.scores(graph, unit, model)
        if not isinstance(s, Tensor):
            raise GraphError(
                f"importance {importance.name!r} returned {type(s).__name__} for unit {unit.name!r}; expected a tensor"
            )
        s = s.detach().flatten().float().cpu()
        if s.numel() != int(unit.channels):
            raise GraphError(
                f"importance {importance.name!r} returned {s.numel()} scores for unit {unit.name!r}, "
                f"which has {unit.channels} channels; expected one score per output channel"
            )
        if not bool(torch.isfinite(s).all()):
            raise GraphError(
                f"importance {importance.name!r} returned non-finite scores (NaN or inf) for unit {unit.name!r}"
            )
        out[unit.name] = s
    zero = zero_scored_units(out)
    if zero:
        warnings.warn(zero_score_message(getattr(importance, "name", "?"), zero), MslimWarning, stacklevel=2)
    return out


# ---------------------------------------------------------------------------- gradients

_TAYLOR: weakref.WeakKeyDictionary[nn.Module, Tensor] = weakref.WeakKeyDictionary()


def accumulated_taylor(module: nn.Module) -> Tensor | None:
    """The Taylor scores a :class:`TaylorAccumulator` summed for this layer, or None.

    None also when the layer's output width changed since (the scores would not line up).
    """
    scores = _TAYLOR.get(module)
    if scores is None:
        return None
    rows = filter_rows(module).shape[0]
    return scores if scores.numel() == rows else None


class TaylorAccumulator:
    """Sums first-order Taylor scores ``sum |w * dL/dw|`` per output channel over training steps.

    Call ``accumulate()`` after each ``loss.backward()`` (before the optimizer step or
    ``zero_grad``); the work is one fused multiply-abs-sum per layer, no loop over channels.
    The sums follow their layer when the model is moved to another device.
    Criteria read the sums with :func:`accumulated_taylor` (keyed by the layer object, so a
    DDP-wrapped or renamed model finds them too). ``reset()`` after removing channels.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | Iterable[Any]) -> None:
        names: list[str] = []
        for item in layers:
            if isinstance(item, str):
                candidates = [item]
            else:  # a Unit: every producer of its channels
                candidates = list(getattr(item, "producers", ())) or [getattr(item, "name")]
            for n in candidates:
                if n not in names:
                    names.append(n)
        self.layers: dict[str, nn.Module] = {n: _submodule(model, n) for n in names}
        self.steps = 0
        for module in self.layers.values():
            _TAYLOR[module] = torch.zeros(filter_rows(module).shape[0], dtype=torch.float32, device=module.weight.device)

    @torch.no_grad()
    def accumulate(self, grad_scale: float = 1.0) -> None:
        """Add this step's ``|w * grad|`` per output channel; ``grad_scale`` divides scaled (AMP) gradients."""
        for module in self.layers.values():
            grad = module.weight.grad
            if grad is None:
                continue
            prod = (module.weight.detach() * grad).abs()
            rows = filter_rows_of(module, prod).sum(1).float()
            if grad_scale != 1.0:
                rows = rows / grad_scale
            buf = _TAYLOR.get(module)
            if buf is None or buf.numel() != rows.numel():  # new layer, or its width changed: start over
                _TAYLOR[module] = rows
            elif buf.device != rows.device:  # the model moved (e.g. to a GPU): the sums follow it
                _TAYLOR[module] = buf.to(rows.device) + rows
            else:
                buf.add_(rows)
        self.steps += 1

    def scores(self, name: str) -> Tensor:
        """The accumulated scores of layer ``name`` (one per output channel)."""
        if name not in self.layers:
            raise GraphError(f"layer {name!r} is not tracked by this accumulator; tracked: {', '.join(self.layers)}")
        module = self.layers[name]
        got = accumulated_taylor(module)
        return got if got is not None else torch.zeros(filter_rows(module).shape[0])

    def reset(self) -> None:
        """Start again from zero (after channels were removed, or between pruning steps)."""
        for module in self.layers.values():
            _TAYLOR[module] = torch.zeros(filter_rows(module).shape[0], dtype=torch.float32, device=module.weight.device)
        self.steps = 0

    def detach(self) -> None:
        """Forget the sums of every tracked layer."""
        for module in self.layers.values():
            _TAYLOR.pop(module, None)

    def state_dict(self) -> dict[str, Any]:
        """Steps and per-layer sums (tensors on the CPU), for resuming."""
        return {"steps": self.steps, "scores": {n: self.scores(n).detach().cpu().clone() for n in self.layers}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a size mismatch names the layer."""
        self.steps = int(state.get("steps", 0))
        for name, tensor in dict(state.get("scores", {})).items():
            if name not in self.layers:
                raise ConfigError(f"Taylor state names layer {name!r}, which this accumulator does not track")
            module = self.layers[name]
            rows = filter_rows(module).shape[0]
            t = torch.as_tensor(tensor, dtype=torch.float32)
            if t.numel() != rows:
                raise ConfigError(f"Taylor state for layer {name!r} has {t.numel()} channels; the layer has {rows}")
            _TAYLOR[module] = t.to(module.weight.device).clone()


def filter_rows_of(module: nn.Module, tensor: Tensor) -> Tensor:
    """``tensor`` shaped like ``module.weight`` laid out as (output channels, weights per filter)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        g = module.groups
        cin, opg = tensor.shape[0], tensor.shape[1]
        return tensor.reshape(g, cin // g, opg, -1).permute(0, 2, 1, 3).reshape(g * opg, -1)
    if tensor.dim() == 1:
        return tensor.reshape(-1, 1)
    return tensor.reshape(tensor.shape[0], -1)
