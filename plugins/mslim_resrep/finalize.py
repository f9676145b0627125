"""ResRep's conversion: fold BN and compactor into each conv, drop the compactor rows that are (near) zero.

For every compacted conv (spec section 4):

1. fold the BN into the conv: ``W' = W * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``;
2. fold the compactor into it: ``W'' = Q @ W'`` over the output dimension, ``b'' = Q @ b'`` (the engine's
   ``fuse_conv_bn`` and ``fuse_conv_conv1x1``): a conv with a bias and D outputs, no BN;
3. remove the outputs whose compactor row has an L2 norm below ``threshold`` (all but the largest when
   every row would go; with ``round_to = N`` the strongest rows that would go are kept until the count
   is a multiple of N) through the engine's ``ChannelGraph``, so every consumer follows.

A zeroed row makes its channel exactly 0 after the compactor, but not always where the next
conv reads it: a depthwise conv, its BN and activation between them (MobileNetV2's expand conv ->
depthwise -> project) turn the 0 into a per-channel constant ``c``. Removing the channel would drop
``W[:, j] * c`` from the consumer, so that constant is folded into the consumer's bias (exact for
1x1 or unpadded convs and linears). A channel whose constant cannot be folded exactly (a padded
k x k consumer) is kept, and counted in the result.

The wrapped model is left untouched: the work happens on a copy. The result is checked against the
wrapped model with the removed rows zeroed (must match to float error) and compared with the wrapped
model itself (differs by exactly the removed rows' contribution, zero when they are zero).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mslim_core.cost import CostModel, count_cost
from mslim_core.equivalence import check_equivalence
from mslim_core.errors import GraphError
from mslim_core.fusion import fuse_conv_bn, fuse_conv_conv1x1
from mslim_core.graph import CONSUMER, ChannelGraph
from mslim_core.tracing import as_input_tuple, run_model

from mslim_resrep.compactor import Compactor
from mslim_resrep.insert import CompactedUnit

__all__ = ["Conversion", "convert", "fold_compactors", "output_difference", "rows_to_keep"]


def rows_to_keep(norms: torch.Tensor, threshold: float, round_to: int = 1) -> torch.Tensor:
    """Bool mask of the rows to keep: norm >= threshold, at least the largest, count rounded up to round_to."""
    norms = norms.detach().cpu()
    keep = norms >= threshold
    if not bool(keep.any()):
        keep = torch.zeros_like(keep)
        keep[int(torch.argmax(norms))] = True
    if round_to > 1:
        k = int(keep.sum())
        want = min(norms.numel(), math.ceil(k / round_to) * round_to)
        if want > k:
            candidates = torch.nonzero(~keep).flatten()
            strongest = candidates[torch.argsort(norms[candidates], descending=True, stable=True)[: want - k]]
            keep[strongest] = True
    return keep


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


@torch.no_grad()
def fold_compactors(model: nn.Module, units: Sequence[CompactedUnit]) -> None:
    """In place: replace each unit's conv (+BN) + compactor by one conv with a bias; the BN slot becomes Identity."""
    for unit in units:
        conv = model.get_submodule(unit.conv_path)
        compactor = model.get_submodule(unit.compactor_path)
        if unit.norm_path is not None:
            conv = fuse_conv_bn(conv, model.get_submodule(unit.norm_path))
        fused = fuse_conv_conv1x1(conv, compactor)
        if unit.norm_name is not None:
            _set_submodule(model, unit.name, fused)
            _set_submodule(model, unit.wrapper_name, nn.Identity())
        else:
            _set_submodule(model, unit.name, fused)


@torch.no_grad()
def _zero_rows(model: nn.Module, units: Sequence[CompactedUnit], removed: dict[str, torch.Tensor]) -> None:
    """Zero the output rows (weight and bias) of the folded convs that are about to be removed."""
    for unit in units:
        idx = removed.get(unit.name)
        if idx is None or idx.numel() == 0:
            continue
        conv = model.get_submodule(unit.name)
        conv.weight.index_fill_(0, idx.to(conv.weight.device), 0.0)
        if conv.bias is not None:
            conv.bias.index_fill_(0, idx.to(conv.bias.device), 0.0)


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    return []


def output_difference(reference: Any, outputs: Any) -> tuple[float, float]:
    """(max absolute difference, max difference relative to the reference's largest magnitude)."""
    refs, gots = _flat_outputs(reference), _flat_outputs(outputs)
    if len(refs) != len(gots) or any(r.shape != g.shape for r, g in zip(refs, gots)):
        raise GraphError("the converted model's outputs do not have the wrapped model's shapes")
    worst_abs = worst_rel = 0.0
    for r, g in zip(refs, gots):
        if r.numel() == 0:
            continue
        diff = float((r.double() - g.double()).abs().max())
        scale = float(r.double().abs().max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
    return worst_abs, worst_rel


def _capture_inputs(model: nn.Module, names: Iterable[str], inputs: tuple[torch.Tensor, ...]) -> dict[str, list[torch.Tensor]]:
    """The first input tensor of every call of the named layers on one eval-mode forward pass."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in set(names):
        module = model.get_submodule(name)

        def hook(m: nn.Module, args: Any, name: str = name) -> None:
            seen.setdefault(name, []).append(args[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _foldable_consumer(module: nn.Module) -> bool:
    """Can a constant input channel of this layer be replaced exactly by a bias?"""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        padding = module.padding
        unpadded = padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
        return unpadded or module.padding_mode != "zeros"
    return False


@torch.no_grad()
def _plan_constants(
    model: nn.Module,
    graph: ChannelGraph,
    units: Sequence[CompactedUnit],
    removed: dict[str, torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Constants the removed channels still feed their consumers, as bias deltas per consumer.

    ``model`` is the folded model with the removed rows zeroed. Returns (bias delta per consumer,
    channels per unit that must be kept because their constant cannot be folded exactly).
    """
    wanted: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for unit in units:
        idx = removed[unit.name]
        if idx.numel() == 0:
            continue
        for member in graph.unit(unit.name).members:
            if member.role != CONSUMER:
                continue
            sel = torch.isin(member.unit_idx, idx)
            if bool(sel.any()):
                wanted.setdefault(member.name, []).append((unit.name, member.unit_idx[sel], member.idx[sel]))
    if not wanted:
        return {}, {}
    captured = _capture_inputs(model, wanted, inputs)
    deltas: dict[str, torch.Tensor] = {}
    keep_back: dict[str, list[int]] = {}
    for name, items in wanted.items():
        module = model.get_submodule(name)
        calls = captured.get(name, [])
        for unit_name, unit_idx, in_idx in items:
            if len(calls) != 1:
                if len(calls) > 1:
                    keep_back.setdefault(unit_name, []).extend(unit_idx.tolist())
                continue
            x = calls[0].double()
            dim = 1 if not isinstance(module, nn.Linear) else x.dim() - 1
            vals = x.index_select(dim, in_idx.to(x.device)).movedim(dim, 0).reshape(in_idx.numel(), -1)
            lo, hi = vals.min(dim=1).values, vals.max(dim=1).values
            scale = float(x.abs().max()) if x.numel() else 0.0
            nonzero = (lo.abs() > 0) | (hi.abs() > 0)
            if not bool(nonzero.any()):
                continue
            constant = (hi - lo) <= 1e-6 * max(scale, 1e-12)
            bad = nonzero & ~(constant & torch.tensor(_foldable_consumer(module)))
            if bool(bad.any()):
                keep_back.setdefault(unit_name, []).extend(unit_idx[bad.cpu()].tolist())
            ok = (nonzero & ~bad).cpu()
            if not bool(ok.any()):
                continue
            c = vals.mean(dim=1)[ok.to(vals.device)]
            cols = in_idx[ok].to(module.weight.device)
            w = module.weight.detach().double().index_select(1, cols)
            if w.dim() > 2:
                w = w.sum(dim=tuple(range(2, w.dim())))
            delta = w @ c.to(w.device)
            deltas[name] = deltas[name] + delta if name in deltas else delta
    keep = {u: torch.unique(torch.tensor(v, dtype=torch.long)) for u, v in keep_back.items()}
    return deltas, keep


@torch.no_grad()
def _add_bias(module: nn.Module, delta: torch.Tensor) -> None:
    ref = module.weight
    if module.bias is None:
        module.bias = nn.Parameter(delta.to(device=ref.device, dtype=ref.dtype))
    else:
        module.bias.add_(delta.to(device=module.bias.device, dtype=module.bias.dtype))


@dataclass
class Conversion:
    """The converted model and what the conversion measured."""

    model: nn.Module
    kept: dict[str, torch.Tensor]
    """Per compacted conv: bool mask of kept rows."""
    macs_after: int
    params_after: int
    predicted_macs: int
    max_output_diff: float
    max_output_rel_diff: float
    equivalence_rel_diff: float | None
    kept_nonzero_constant: int = 0
    """Zero rows kept because their channel feeds a constant to a layer that cannot absorb it exactly."""
    removal_history: list[list[Any]] = field(default_factory=list)


def convert(
    wrapped: nn.Module,
    units: Sequence[CompactedUnit],
    example_inputs: Any,
    row_norms: Sequence[torch.Tensor],
    cost_model: CostModel,
    threshold: float,
    round_to: int = 1,
    ignored_layers: Iterable[str] = (),
    check: bool = True,
    rtol: float = 1e-4,
) -> Conversion:
    """Fold and shrink a copy of ``wrapped``; ``row_norms[i]`` are unit i's compactor row norms.

    With ``check``, the result must match the wrapped model with the removed rows zeroed (relative
    ``rtol``), or an ``EquivalenceError`` names the first diverging layer.
    """
    inputs = as_input_tuple(example_inputs)
    reference_out = run_model(wrapped, inputs)
    kept = {u.name: rows_to_keep(n, threshold, round_to) for u, n in zip(units, row_norms)}
    removed = {name: torch.nonzero(~k).flatten() for name, k in kept.items()}

    names = {n for n, _ in wrapped.named_modules()}
    ignored = [n for n in ignored_layers if n in names]
    kept_back = 0
    for _ in range(3):
        model = copy.deepcopy(wrapped)
        fold_compactors(model, units)
        _zero_rows(model, units, removed)
        graph = ChannelGraph(model, inputs, ignored_layers=ignored)
        deltas, keep_back = _plan_constants(model, graph, units, removed, inputs)
        if not keep_back:
            break
        for unit_name, idx in keep_back.items():
            kept[unit_name][idx] = True
            kept_back += int(idx.numel())
            removed[unit_name] = torch.nonzero(~kept[unit_name]).flatten()
    else:
        raise GraphError("could not settle which zero rows can be removed exactly; please report this model")
    zeroed_reference = copy.deepcopy(model) if check else None
    consumers = {name: model.get_submodule(name) for name in deltas}
    for unit in units:
        idx = removed[unit.name]
        if idx.numel():
            graph.remove_channels(unit.name, idx)
    surviving = graph.kept_channels()
    for name, delta in deltas.items():
        rows = surviving.get(name)
        _add_bias(consumers[name], delta if rows is None else delta[rows.to(delta.device)])
    leftovers = [n for n, m in model.named_modules() if isinstance(m, Compactor)]
    if leftovers:
        raise GraphError(f"internal error: compactors left after conversion at {leftovers}")

    widths = torch.tensor([int(k.sum()) for k in kept.values()], dtype=torch.int64)
    predicted = int(cost_model.macs(widths))
    cost = count_cost(model, inputs)
    diff_abs, diff_rel = output_difference(reference_out, run_model(model, inputs))
    equivalence = None
    if zeroed_reference is not None:
        equivalence = check_equivalence(zeroed_reference, model, inputs, rtol=rtol, kept=graph)
    return Conversion(
        model=model,
        kept=kept,
        macs_after=cost.macs,
        params_after=cost.params,
        predicted_macs=predicted,
        max_output_diff=diff_abs,
        max_output_rel_diff=diff_rel,
        equivalence_rel_diff=equivalence,
        kept_nonzero_constant=kept_back,
        removal_history=[r.to_json() for r in graph.history],
    )
