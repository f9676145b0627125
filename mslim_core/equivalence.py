"""The safety check for channel removal: a pruned model must equal the original with those
channels zeroed.

Zeroing a channel in every layer that produces or normalises it makes it output exactly 0 (for
activations with f(0) = 0: ReLU, SiLU, GELU, hardswish, ...), which is what removing it means for
every later layer. :func:`zero_channels` builds that reference; :func:`check_equivalence`
compares outputs and, on a mismatch, names the first layer whose activations diverge.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mslim_core.errors import EquivalenceError, GraphError
from mslim_core.graph import OUT_ROLES, ChannelGraph, Unit
from mslim_core.removal import check_int_list
from mslim_core.tracing import as_input_tuple, preserved_modes


def zero_channels(
    model: nn.Module,
    graph_or_units: ChannelGraph | Iterable[Unit],
    removed: Mapping[str, Sequence[int] | Tensor],
) -> nn.Module:
    """A deep copy of the unpruned `model` whose `removed` channels output exactly zero.

    `removed` maps unit names to channel indices in the graph's build-time indexing (what
    ``ChannelGraph.removed_channels()`` returns). For every producer, depthwise conv, norm and
    per-channel parameter of each unit, the matching weight rows, biases, norm weights/biases
    and running means are zeroed.
    """
    units = graph_or_units.units if isinstance(graph_or_units, ChannelGraph) else list(graph_or_units)
    by_name = {u.name: u for u in units}
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for unit_name, idxs in removed.items():
            if unit_name not in by_name:
                raise GraphError(f"zero_channels: no unit named {unit_name!r} (units: {', '.join(by_name)})")
            unit = by_name[unit_name]
            want = torch.tensor(check_int_list(idxs, f"unit '{unit_name}'"), dtype=torch.long)
            bad = want[(want < 0) | (want >= unit.original_channels)]
            if bad.numel():
                raise GraphError(
                    f"zero_channels: unit '{unit_name}' has {unit.original_channels} channels, "
                    f"got indices {bad.tolist()[:10]}"
                )
            for member in unit.members:
                if member.role not in OUT_ROLES:
                    continue
                rows = member.idx[torch.isin(member.unit_idx, want)]
                if rows.numel():
                    _zero_member(ref, modules, member.name, member.role, rows)
    return ref


def _zero_member(ref: nn.Module, modules: dict[str, nn.Module], name: str, role: str, rows: Tensor) -> None:
    if role == "param":
        p = ref.get_parameter(name)
        dim = max(i for i, s in enumerate(p.shape) if s > 1) if any(s > 1 for s in p.shape) else 0
        p.index_fill_(dim, rows, 0.0)
        return
    mod = modules.get(name)
    if mod is None:
        raise GraphError(f"zero_channels: the model has no layer named {name!r}; pass the unpruned original")
    if isinstance(mod, nn.modules.conv._ConvNd):
        dim = 1 if mod.transposed else 0
        if int(rows.max()) >= mod.weight.shape[dim] * (mod.groups if mod.transposed else 1):
            raise _too_small(name)
        mod.weight.index_fill_(dim, rows, 0.0)
        if mod.bias is not None:
            mod.bias.index_fill_(0, rows, 0.0)
    elif isinstance(mod, nn.Linear):
        if int(rows.max()) >= mod.out_features:
            raise _too_small(name)
        mod.weight.index_fill_(0, rows, 0.0)
        if mod.bias is not None:
            mod.bias.index_fill_(0, rows, 0.0)
    else:  # norms, PReLU: zero every per-channel tensor that shifts or scales the channel
        for attr in ("weight", "bias", "running_mean"):
            t = getattr(mod, attr, None)
            if isinstance(t, Tensor) and t.dim() == 1 and t.numel() > 1:
                if int(rows.max()) >= t.numel():
                    raise _too_small(name)
                if attr != "weight" or not isinstance(mod, nn.PReLU):
                    t.index_fill_(0, rows, 0.0)


def _too_small(name: str) -> GraphError:
    return GraphError(f"zero_channels: layer '{name}' is smaller than the graph says; pass the unpruned original")


def _flatten_outputs(out: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    if isinstance(out, Tensor):
        return [(prefix, out)]
    if isinstance(out, (list, tuple)):
        return [kv for i, o in enumerate(out) for kv in _flatten_outputs(o, f"{prefix}[{i}]")]
    if isinstance(out, dict):
        return [kv for k, o in out.items() for kv in _flatten_outputs(o, f"{prefix}[{k!r}]")]
    return [(prefix, out)]


def _run(model: nn.Module, inputs: tuple[Tensor, ...], hooks: bool) -> tuple[Any, list[tuple[str, str, Any]]]:
    """Outputs of `model` in eval mode, and (when `hooks`) every module's output in call order."""
    calls: list[tuple[str, str, Any]] = []
    handles = []
    if hooks:
        for name, mod in model.named_modules():
            if not name:
                continue

            def hook(m: nn.Module, a: Any, out: Any, name: str = name) -> None:
                calls.append((name, type(m).__name__, out))

            handles.append(mod.register_forward_hook(hook))
    try:
        with preserved_modes(model, train=False), torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def _diff(ref: Tensor, got: Tensor) -> tuple[float, float]:
    """(max abs difference, output scale) of two tensors of the same shape."""
    ref, got = ref.detach().float(), got.detach().float()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((ref - got).abs().max()) if ref.numel() else 0.0
    return diff, scale


def check_equivalence(
    reference: nn.Module,
    pruned: nn.Module,
    example_inputs: Any,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    kept: Mapping[str, Tensor] | ChannelGraph | None = None,
) -> float:
    """Largest output difference relative to the output scale; EquivalenceError when above `rtol`.

    Both models run in eval mode without gradients. An output passes when
    ``max|ref - pruned| <= rtol * max|ref| + atol``. On a mismatch the error names the first
    layer (in call order) whose activations diverge; layers whose outputs lost channels are
    compared on the surviving channels when `kept` (``ChannelGraph.kept_channels()`` or the graph)
    says which they are, and skipped otherwise.
    """
    inputs = as_input_tuple(example_inputs)
    if isinstance(kept, ChannelGraph):
        kept = kept.kept_channels()
    ref_out, _ = _run(reference, inputs, hooks=False)
    got_out, _ = _run(pruned, inputs, hooks=False)
    ref_items, got_items = _flatten_outputs(ref_out), _flatten_outputs(got_out)
    if [k for k, _ in ref_items] != [k for k, _ in got_items]:
        raise EquivalenceError(
            f"the pruned model returns {[k for k, _ in got_items]}, the reference {[k for k, _ in ref_items]}"
        )
    worst, problem = 0.0, None
    for (key, r), (_, g) in zip(ref_items, got_items):
        if not isinstance(r, Tensor) or not isinstance(g, Tensor):
            if r != g:
                problem = f"{key} differs ({r!r} vs {g!r})"
            continue
        if r.shape != g.shape:
            problem = f"{key} has shape {tuple(g.shape)}, the reference {tuple(r.shape)}"
            break
        diff, scale = _diff(r, g)
        rel = diff / scale if scale > 0 else diff
        worst = max(worst, rel)
        if not diff <= rtol * scale + atol:
            problem = f"{key} differs by {diff:.3g} (relative {rel:.3g} > rtol {rtol:g})"
            break
    if problem is None:
        return worst
    raise EquivalenceError(
        f"pruned model does not match the reference: {problem}. "
        + _first_divergence(reference, pruned, inputs, rtol, atol, kept or {})
    )


def _first_divergence(
    reference: nn.Module,
    pruned: nn.Module,
    inputs: tuple[Tensor, ...],
    rtol: float,
    atol: float,
    kept: Mapping[str, Tensor],
) -> str:
    _, ref_calls = _run(reference, inputs, hooks=True)
    _, got_calls = _run(pruned, inputs, hooks=True)
    ref_by_name: dict[str, list[Any]] = {}
    for name, _, out in ref_calls:
        ref_by_name.setdefault(name, []).append(out)
    seen: dict[str, int] = {}
    for name, kind, out in got_calls:
        k = seen.get(name, 0)
        seen[name] = k + 1
        refs = ref_by_name.get(name, [])
        if k >= len(refs) or not isinstance(out, Tensor) or not isinstance(refs[k], Tensor):
            continue
        r = refs[k]
        if r.shape != out.shape:
            ids = kept.get(name)
            if ids is None or r.dim() < 2 or ids.numel() != out.shape[1]:
                continue
            if ids.numel() and r.shape[1] <= int(ids.max()):
                continue
            r = r.index_select(1, ids.to(r.device))
            if r.shape != out.shape:
                continue
        diff, scale = _diff(r, out)
        if not diff <= rtol * scale + atol:
            return (
                f"First diverging layer: '{name}' ({kind}), max abs difference {diff:.3g} "
                f"at output scale {scale:.3g}."
            )
    return "No single layer's output could be matched as diverging; the difference arises between layers."
