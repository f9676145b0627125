"""One-shot channel pruning by an importance criterion: score, select to the FLOPs target,
remove through the channel graph, self-check against the zeroed original, report.

Shared by every algorithm that prunes in one go from scores (magnitude, slimming).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mslim_core.cost import CostModel, count_cost
from mslim_core.equivalence import check_equivalence, zero_channels
from mslim_core.errors import GraphError, TargetNotReachedWarning
from mslim_core.graph import ChannelGraph, Unit
from mslim_core.importance import get_importance, score_units, zero_score_message, zero_scored_units
from mslim_core.pruner import Pruner
from mslim_core.removal import removals_to_json
from mslim_core.report import PruneReport
from mslim_core.selection import Selection, SelectionConfig, channel_sets, select_channels
from mslim_core.tracing import run_model


def _json_removed(removed: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {name: [int(i) for i in idx.tolist()] for name, idx in removed.items()}


def _max_abs_diff(reference: nn.Module, pruned: nn.Module, inputs: Any) -> float:
    """Largest absolute difference between the two models' outputs (every output tensor)."""

    def flat(out: Any) -> list[torch.Tensor]:
        if isinstance(out, torch.Tensor):
            return [out]
        if isinstance(out, (list, tuple)):
            return [t for o in out for t in flat(o)]
        if isinstance(out, dict):
            return [t for k in sorted(out, key=str) for t in flat(out[k])]
        return []

    ref = flat(run_model(reference, inputs))
    got = flat(run_model(pruned, inputs))
    return max((float((a.float() - b.float()).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)


def tied_sets_problem(graph: ChannelGraph, unit: Unit) -> str:
    """Why ``unit``'s tied channels (grouped convs, ``chunk()``) cannot be pruned in whole sets ("" when
    they can, or are not tied); every ranking pruner leaves such a unit out with this reason."""
    try:
        channel_sets(graph, unit)
    except GraphError as exc:
        return str(exc).removeprefix(f"unit {unit.name!r}: ")
    return ""


def sets_of_units(graph: ChannelGraph, units: Sequence[Unit], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The channel sets (see ``channel_sets``) of the scored units whose channels are tied, by unit name."""
    out: dict[str, torch.Tensor] = {}
    for unit in units:
        if unit.name in scores:
            sets = channel_sets(graph, unit, scores[unit.name])
            if sets is not None:
                out[unit.name] = sets
    return out


def target_miss(flops_target: float, ratio: float, reached: bool, reason: str | None,
                predicted_ratio: float) -> str | None:
    """Why a pruned model misses its FLOPs target (None when it meets it within 0.01).

    ``reached``/``reason`` come from the selection, ``ratio`` is the measured MACs ratio and
    ``predicted_ratio`` the cost model's; every ranking pruner reports a miss with these words.
    """
    if not reached:
        return reason or f"FLOPs target {flops_target} not reached"
    if ratio > flops_target + 0.01:
        return (
            f"achieved MACs ratio {ratio:.4f} is above flops_target {flops_target} "
            f"(the cost model predicted {predicted_ratio:.4f})"
        )
    return None


def prune_by_importance(
    pruner: Pruner,
    importance: Any,
) -> tuple[nn.Module, PruneReport]:
    """Score, select to ``pruner.config.flops_target``, remove, self-check and report (one shot).

    Ranking and limits come from ``pruner.config``, a ``SelectionConfig``.

    The model of ``pruner`` is pruned in place. Used by ``magnitude`` and ``slimming``;
    other one-shot pruners with a different criterion can call it as is. Units whose channels
    are tied (grouped convs, ``chunk()``) lose whole channel sets (see ``channel_sets``).
    """
    config = pruner.config
    if not isinstance(config, SelectionConfig):
        raise TypeError(f"prune_by_importance needs a SelectionConfig, {pruner.name!r} has {type(config).__name__}")
    model = pruner.model
    inputs = pruner.example_inputs
    criterion = get_importance(importance)
    before = count_cost(model, inputs)
    graph = ChannelGraph(model, inputs, ignored_layers=list(config.ignored_layers))
    if not graph.units:
        why = "; ".join(f"'{n}': {r}" for n, r in list(graph.skipped.items())[:8])
        raise GraphError(
            f"{pruner.name} found no prunable layer in the model"
            + (f" ({why})" if why else " (no conv or linear layer whose output channels can shrink)")
        )
    report_warnings: list[str] = []
    units = []
    for unit in graph.units:
        if not config.prune_coupled and not unit.independent:
            continue
        why = tied_sets_problem(graph, unit)
        if why:
            report_warnings.append(f"unit {unit.name!r} is not pruned: {why}")
            continue
        applicable = getattr(criterion, "applicable", None)
        if applicable is not None and not applicable(unit, model):
            report_warnings.append(
                f"unit {unit.name!r} is not pruned: importance {getattr(criterion, 'name', importance)!r} "
                "cannot score it (for bn_scale: no norm layer with a scale acts on its channels)"
            )
            continue
        units.append(unit)
    cost = CostModel(model, inputs, graph.units)
    scores = score_units(criterion, graph, model, units)  # warns when a unit scored zero everywhere
    zero = zero_scored_units(scores)
    if zero:
        report_warnings.append(zero_score_message(getattr(criterion, "name", str(importance)), zero))
    selection: Selection = select_channels(
        cost,
        scores,
        config.flops_target,
        **config.selection_options(),
        reference_macs=before.macs,
        channel_sets=sets_of_units(graph, units, scores),
    )
    # the reference: the unpruned model with the chosen channels zeroed (indices are build-time ones here)
    zeroed = zero_channels(model, graph, selection.removed) if config.check_equivalence else None
    for name, idxs in selection.removed.items():
        graph.remove_channels(name, idxs)
    after = count_cost(model, inputs)

    max_diff = None
    if zeroed is not None:
        check_equivalence(zeroed, model, inputs, kept=graph)
        max_diff = _max_abs_diff(zeroed, model, inputs)

    ratio = after.macs / before.macs if before.macs else 1.0
    missed = None
    if not units and ratio > config.flops_target:
        missed = (
            f"FLOPs target {config.flops_target} not reachable: no unit could be pruned "
            "(see the other warnings for why each was left out)"
        )
    else:
        missed = target_miss(config.flops_target, ratio, selection.reached, selection.reason, selection.flops_ratio)
    if missed is not None:
        report_warnings.append(missed)
        warnings.warn(missed, TargetNotReachedWarning, stacklevel=3)
    by_name = {u.name: u for u in units}
    report = PruneReport(
        algorithm=pruner.name,
        config=config.model_dump(mode="json"),
        flops_target=config.flops_target,
        macs_before=before.macs,
        macs_after=after.macs,
        params_before=before.params,
        params_after=after.params,
        layer_widths={
            name: (selection.widths_before[name], by_name[name].channels) for name in selection.widths_before if name in by_name
        },
        max_output_diff=max_diff,
        warnings=report_warnings,
        extra={
            "importance": getattr(criterion, "name", str(importance)),
            "mode": config.mode,
            "predicted_macs": selection.macs_after,
            "uniform_ratio": selection.ratio,
            "target_reached": selection.reached,
            "removed_channels": _json_removed(graph.removed_channels()),
            "removals": removals_to_json(graph.history),
            "units_pruned": len(selection.removed),
            "units_considered": len(units),
        },
    )
    return model, report
