"""``TaylorPruner``: iterative pruning by first-order Taylor importance (Molchanov et al., CVPR 2019).

While training, ``after_backward`` sums ``|w * dL/dw|`` per output channel (a
:class:`~mslim_core.importance.TaylorAccumulator`) over the batches before each round. Every
``interval`` iterations ``step`` runs a round: it ranks channels (by the accumulated scores,
or any registered criterion), removes the weakest through the engine until the model is at
the round's intermediate FLOPs target (units whose channels are tied by grouped convs or a
``chunk()`` lose whole channel sets), checks the smaller model against the model just
before the round with those channels zeroed, and re-points the optimizers at the new,
smaller parameters (momentum buffers follow). Training between rounds fine-tunes. After
``pruning_steps`` rounds the model is at ``flops_target``; ``finalize`` runs any rounds that
are left and reports.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from mslim_core.cost import CostModel, count_cost
from mslim_core.equivalence import check_equivalence, zero_channels
from mslim_core.errors import CheckpointError, ConfigError, TargetNotReachedWarning
from mslim_core.graph import ChannelGraph, Unit
from mslim_core.importance import TaylorAccumulator, get_importance, score_units
from mslim_core.oneshot import sets_of_units, target_miss, tied_sets_problem
from mslim_core.pruner import Pruner
from mslim_core.removal import removals_from_json, removals_to_json
from mslim_core.report import PruneReport
from mslim_core.selection import SelectionConfig, select_channels
from mslim_core.tracing import run_model
from mslim_taylor.optimizer_sync import follow_removal
from mslim_taylor.schedule import RoundSchedule, round_targets

__all__ = ["TaylorConfig", "TaylorPruner"]


class TaylorConfig(SelectionConfig):
    """Options of ``taylor``: the criterion, the round schedule, how channels are ranked, per-layer limits."""

    importance: str = Field(
        "taylor",
        description="Criterion ranking the channels at each round: 'taylor' (|w * grad| summed over the "
        "accumulated batches) or any registered criterion name (l1, l2, bn_scale, fpgm, random, ...).",
    )
    pruning_steps: int = Field(5, ge=1, description="Number of pruning rounds; the last one reaches flops_target.")
    interval: int | None = Field(
        None,
        ge=1,
        description="Training iterations between rounds (round k after k * interval iterations). Default: "
        "total_iters // (pruning_steps + 1); without either, every round runs in finalize().",
    )
    total_iters: int | None = Field(
        None, ge=1, description="Iterations the training will run (set by mslim.prune / mslim train); gives interval."
    )
    accumulate_iters: int | None = Field(
        None,
        ge=1,
        description="Batches whose gradients are accumulated into the scores before each round "
        "(the last ones before it; default and at most: the whole interval).",
    )
    schedule: Literal["geometric", "linear"] = Field(
        "geometric",
        description="Intermediate FLOPs targets: geometric (flops_target ** (k / pruning_steps)) or linear.",
    )


def _inputs_like(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The example inputs on the model's device (the trainer may have moved the model)."""
    device = next((p.device for p in model.parameters()), None)
    if device is None:
        return inputs
    return tuple(t.to(device) if isinstance(t, Tensor) else t for t in inputs)


def _outputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[Tensor]:
    out = run_model(model, inputs)
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, Tensor)]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out, key=str) if isinstance(out[k], Tensor)]
    return []


class TaylorPruner(Pruner):
    """Iterative pruning to a FLOPs target by accumulated first-order Taylor scores, fine-tuning between rounds."""

    name = "taylor"
    description = "Iterative pruning by accumulated |w * grad| Taylor scores with fine-tuning between rounds (Molchanov et al., 2019)"
    Config = TaylorConfig
    trains = True

    def __init__(self, model: nn.Module, example_inputs: Any, config: TaylorConfig) -> None:
        super().__init__(model, example_inputs, config)
        self.criterion = get_importance(config.importance)  # an unknown name fails here, before any work
        self.schedule = RoundSchedule.from_options(
            config.pruning_steps, config.interval, config.total_iters, config.accumulate_iters
        )
        self.targets = round_targets(config.flops_target, config.pruning_steps, config.schedule)
        self.rounds: list[dict[str, Any]] = []
        self.iteration = 0
        self.accumulator: TaylorAccumulator | None = None
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._stale = False  # the accumulated scores are left over from before the last round
        self._unit_names: list[str] = []
        self._skipped: list[str] = []
        self._finalized = False

    # ------------------------------------------------------------------ setup
    @property
    def rounds_done(self) -> int:
        """Number of pruning rounds run so far."""
        return len(self.rounds)

    def prepare(self) -> None:
        """Trace the model, choose the units to prune, count the original cost, start accumulating."""
        config: TaylorConfig = self.config  # type: ignore[assignment]
        inputs = _inputs_like(self.model, self.example_inputs)
        self.graph = ChannelGraph(self.model, inputs, ignored_layers=list(config.ignored_layers))
        for unit in self.graph.units:
            why = self._not_prunable(unit)
            if why:
                self._skipped.append(f"unit {unit.name!r} is not pruned: {why}")
            else:
                self._unit_names.append(unit.name)
        self.original_widths = {u.name: int(u.channels) for u in self.graph.units}
        cost = count_cost(self.model, inputs)
        self.macs_before, self.params_before = cost.macs, cost.params
        self.macs_now = cost.macs
        if self.criterion.needs_gradients and self._unit_names:
            self.accumulator = TaylorAccumulator(self.model, self.units())

    def _not_prunable(self, unit: Unit) -> str:
        config: TaylorConfig = self.config  # type: ignore[assignment]
        if not config.prune_coupled and not unit.independent:
            return "it is a coupled group and prune_coupled is False"
        tied = tied_sets_problem(self.graph, unit)
        if tied:
            return tied
        if not self.criterion.applicable(unit, self.model):
            return f"importance {self.criterion.name!r} cannot score it"
        return ""

    def units(self) -> list[Unit]:
        """The units this pruner ranks and prunes."""
        return [self.graph.unit(n) for n in self._unit_names]

    def optimizer(
        self, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False
    ) -> torch.optim.Optimizer:
        """SGD over ``param_groups``, tracked so that every round re-points it at the pruned parameters."""
        opt = super().optimizer(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.track_optimizer(opt)
        return opt

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep ``optimizer`` (one you built yourself) valid across rounds: its ``param_groups`` and
        per-parameter state are updated in place whenever channels are removed."""
        self._optimizers.add(optimizer)

    # ------------------------------------------------------------------ training hooks
    def after_backward(self) -> None:
        """Add this batch's ``|w * grad|`` to the scores of the next round (inside its window)."""
        if self.accumulator is None or not self.schedule.accumulates(self.iteration, self.rounds_done):
            return
        if self._stale:
            self.accumulator.reset()
            self._stale = False
        self.accumulator.accumulate()

    def step(self, iteration: int) -> None:
        """Run a pruning round when one is due after iteration ``iteration``."""
        self.iteration = iteration + 1
        if self.schedule.round_due(self.iteration, self.rounds_done):
            self._run_round(at_finalize=False)

    def progress(self) -> dict[str, float]:
        """The current FLOPs ratio (MACs now / original) and the number of rounds done."""
        ratio = self.macs_now / self.macs_before if self.macs_before else 1.0
        return {"flops_ratio": float(ratio), "round": float(self.rounds_done)}

    # ------------------------------------------------------------------ rounds
    def _has_scores(self) -> bool:
        return self.accumulator is None or self.accumulator.steps > 0

    def _run_round(self, at_finalize: bool) -> dict[str, Any]:
        """Prune to the next intermediate target: score, select, zero-copy, remove, re-point, check."""
        config: TaylorConfig = self.config  # type: ignore[assignment]
        if not self._has_scores():
            raise ConfigError(
                f"importance {self.criterion.name!r} ranks channels by accumulated gradients, but none were "
                "accumulated: call session.after_backward() after each loss.backward() while training "
                "(or train with mslim.prune(..., train_loader=..., epochs=...)), or choose importance='l1'"
            )
        model = self.model
        inputs = _inputs_like(model, self.example_inputs)
        target = self.targets[self.rounds_done]
        units = self.units()
        scores = score_units(self.criterion, self.graph, model, units)
        cost = CostModel(model, inputs, self.graph.units)
        original = torch.tensor([self.original_widths[u.name] for u in cost.units], dtype=torch.int64)
        selection = select_channels(
            cost,
            scores,
            target,
            **config.selection_options(),
            reference_macs=self.macs_before,
            original_widths=original,
            channel_sets=sets_of_units(self.graph, units, scores),
        )
        reference = None
        if config.check_equivalence and selection.removed:
            fresh = ChannelGraph(model, inputs, ignored_layers=list(config.ignored_layers))
            reference = zero_channels(model, fresh, selection.removed)
        kept_before = self.graph.kept_channels()
        sums = self.accumulator.state_dict() if self.accumulator is not None and selection.removed else None
        if selection.removed:
            with follow_removal(model, list(self._optimizers)):
                for name, idxs in selection.removed.items():
                    self.graph.remove_channels(name, idxs)
        kept_after = self.graph.kept_channels()
        survivors = {
            name: torch.nonzero(torch.isin(kept_before[name], ids)).flatten() for name, ids in kept_after.items()
        }
        self._carry_scores(sums, survivors)
        max_diff = None
        if reference is not None:
            check_equivalence(reference, model, inputs, kept=survivors)
            pairs = zip(_outputs(reference, inputs), _outputs(model, inputs))
            max_diff = max((float((a.float() - b.float()).abs().max()) for a, b in pairs if a.numel()), default=0.0)
            del reference
        self.macs_now = count_cost(model, inputs).macs
        record = {
            "round": self.rounds_done + 1,
            "iteration": self.iteration,
            "at_finalize": at_finalize,
            "target": float(target),
            "flops_ratio": self.macs_now / self.macs_before if self.macs_before else 1.0,
            "predicted_macs": int(selection.macs_after),
            "macs": int(self.macs_now),
            "channels_removed": int(selection.num_removed),
            "accumulated_batches": int(self.accumulator.steps) if self.accumulator is not None else 0,
            "reached": bool(selection.reached),
            "reason": selection.reason,
            "max_output_diff": max_diff,
        }
        self.rounds.append(record)
        return record

    def _carry_scores(self, state: dict[str, Any] | None, survivors: dict[str, Tensor]) -> None:
        """Keep the accumulated scores (``state``, taken before the removal) of the surviving channels,
        used if no new batch comes before the next round (e.g. rounds left to ``finalize``); the next
        accumulation starts from zero."""
        if self.accumulator is None or state is None:
            return
        state["scores"] = {
            name: scores[survivors[name].to(scores.device)] if name in survivors else scores
            for name, scores in state["scores"].items()
        }
        self.accumulator.load_state_dict(state)
        self._stale = True

    # ------------------------------------------------------------------ finalize
    def finalize(self) -> tuple[nn.Module, PruneReport]:
        """Run the rounds that are left (without fine-tuning between them), then report."""
        config: TaylorConfig = self.config  # type: ignore[assignment]
        while self.rounds_done < config.pruning_steps:
            self._run_round(at_finalize=True)
        model = self.model
        inputs = _inputs_like(model, self.example_inputs)
        after = count_cost(model, inputs)
        ratio = after.macs / self.macs_before if self.macs_before else 1.0
        report_warnings = list(self._skipped)
        last = self.rounds[-1]
        predicted = last["predicted_macs"] / self.macs_before if self.macs_before else 1.0
        problem = target_miss(config.flops_target, ratio, bool(last["reached"]), last["reason"], predicted)
        if problem:
            report_warnings.append(problem)
            if ratio > config.flops_target + 1e-9:
                warnings.warn(problem, TargetNotReachedWarning, stacklevel=3)
        diffs = [r["max_output_diff"] for r in self.rounds if r["max_output_diff"] is not None]
        removed = self.graph.removed_channels()
        self._finalized = True
        report = PruneReport(
            algorithm=self.name,
            config=config.model_dump(mode="json"),
            flops_target=config.flops_target,
            macs_before=self.macs_before,
            macs_after=after.macs,
            params_before=self.params_before,
            params_after=after.params,
            layer_widths={n: (self.original_widths[n], int(self.graph.unit(n).channels)) for n in self._unit_names},
            max_output_diff=max(diffs) if diffs else None,
            warnings=report_warnings,
            extra={
                "importance": self.criterion.name,
                "mode": config.mode,
                "schedule": config.schedule,
                "interval": self.schedule.interval,
                "targets": list(self.targets),
                "rounds": copy.deepcopy(self.rounds),
                "rounds_at_finalize": sum(1 for r in self.rounds if r["at_finalize"]),
                "target_reached": bool(last["reached"]),
                "predicted_macs": int(last["predicted_macs"]),
                "removed_channels": {n: [int(i) for i in ids.tolist()] for n, ids in removed.items()},
                "removals": removals_to_json(self.graph.history),
                "units_pruned": len(removed),
                "units_considered": len(self._unit_names),
            },
        )
        return model, report

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Rounds done, the removal record (to replay on a fresh model) and the accumulated scores."""
        return {
            "iteration": self.iteration,
            "rounds": copy.deepcopy(self.rounds),
            "removals": removals_to_json(self.graph.history),
            "accumulator": self.accumulator.state_dict() if self.accumulator is not None else None,
            "stale": self._stale,
            "finalized": self._finalized,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the recorded removals on this (freshly prepared) model, re-point tracked optimizers,
        and restore the schedule and scores. Load the model's and optimizer's weights afterwards."""
        if self.graph.history:
            raise CheckpointError(
                "this taylor session has already removed channels; load its state into a freshly prepared "
                "session (mslim.prepare on a newly built model)"
            )
        removals = removals_from_json(state.get("removals", []))
        rounds = list(state.get("rounds", []))
        if len(rounds) > self.config.pruning_steps:  # type: ignore[attr-defined]
            raise CheckpointError(
                f"taylor state records {len(rounds)} rounds, more than pruning_steps="
                f"{self.config.pruning_steps}; resume with the options of the run that wrote it"  # type: ignore[attr-defined]
            )
        with follow_removal(self.model, list(self._optimizers)):
            self.graph.replay(removals)
        self.rounds = rounds
        self.iteration = int(state.get("iteration", 0))
        self._stale = bool(state.get("stale", False))
        self._finalized = bool(state.get("finalized", False))
        if self.accumulator is not None and state.get("accumulator") is not None:
            self.accumulator.load_state_dict(state["accumulator"])
        self.macs_now = count_cost(self.model, _inputs_like(self.model, self.example_inputs)).macs
