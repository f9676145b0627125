"""``ResRepPruner``: the ``resrep`` algorithm driven through a ``PruningSession``.

Lifecycle: ``prepare()`` inserts identity compactors (the model is changed in place);
per training iteration ``after_backward()`` resets the compactor gradients (mask + group lasso)
and ``step(iteration)`` runs the proximal zeroing of masked rows and, every ``mask_interval``
iterations, the mask update; ``finalize()`` folds BN and compactors into the convs and removes
the zero rows.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from mslim_core.config import format_validation_error
from mslim_core.cost import Cost, CostModel, count_cost
from mslim_core.errors import CheckpointError, ConfigError, GraphError, MslimError, TargetNotReachedWarning
from mslim_core.pruner import Pruner
from mslim_core.report import PruneReport
from mslim_core.tracing import as_input_tuple

from mslim_resrep.bank import CompactorBank
from mslim_resrep.compactor import Compactor
from mslim_resrep.config import ResolvedSchedule, ResRepConfig, resolve_schedule
from mslim_resrep.finalize import convert
from mslim_resrep.gradients import reset_gradients
from mslim_resrep.insert import CompactedUnit, insert_compactors, select_units
from mslim_resrep.schedule import MaskChoice, choose_masked_rows

__all__ = ["COMPACTOR_GROUP", "ResRepPruner", "RoundedCost", "set_momentum"]

STATE_VERSION = 1
COMPACTOR_GROUP = "compactor"
"""``name`` of the optimizer parameter group holding the compactor weights."""

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """Set the momentum of every parameter group except the compactors' (which keep theirs, 0.99).

    Use this in a momentum warm-up instead of overwriting every group's momentum.
    """
    for group in optimizer.param_groups:
        if group.get("name") != COMPACTOR_GROUP:
            group["momentum"] = momentum


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels
    )


class RoundedCost:
    """MACs at unit widths rounded up to a multiple of ``round_to`` (capped at the full widths), as finalize keeps them.

    Rounding up keeps the MACs non-increasing in the number of removed rows, so the schedule's
    binary search stays valid; the masks then reach ``flops_target`` after finalize's rounding.
    """

    def __init__(self, cost: CostModel, full_widths: torch.Tensor, round_to: int) -> None:
        self.cost, self.full, self.round_to = cost, full_widths.to(torch.int64), int(round_to)

    def macs(self, widths: torch.Tensor | None = None) -> int | torch.Tensor:
        """Total MACs at these widths (one row per candidate when ``widths`` is 2-D), after rounding."""
        if widths is None:
            return self.cost.macs(None)
        w = torch.as_tensor(widths, dtype=torch.int64)
        r = self.round_to
        return self.cost.macs(torch.minimum(torch.div(w + r - 1, r, rounding_mode="floor") * r, self.full))


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


def _broadcast_from_rank0(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's copy of ``tensor`` on every rank when torch.distributed is running, else ``tensor``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    work = tensor.to(torch.int64)
    if dist.get_backend() == "nccl":
        work = work.to(device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device()))
    dist.broadcast(work, src=0)
    return work.to(device="cpu", dtype=tensor.dtype)


class ResRepPruner(Pruner):
    """ResRep: compactors trained with masked group-lasso gradients, then folded away losslessly."""

    name = "resrep"
    description = "ResRep (ICCV 2021): compactors with masked lasso gradients, folded into the convs at the end"
    Config = ResRepConfig
    trains = True

    config: ResRepConfig

    def __init__(self, model: nn.Module, example_inputs: Any, config: ResRepConfig) -> None:
        super().__init__(model, example_inputs, config)
        self.schedule: ResolvedSchedule = resolve_schedule(config)
        self.units: list[CompactedUnit] = []
        self.skipped: dict[str, str] = {}
        self.bank: CompactorBank | None = None
        self.cost: CostModel | None = None
        self.original_cost: Cost | None = None
        self.original_macs = 0
        self._widths = torch.zeros(0, dtype=torch.int64)
        self._masked_at = torch.zeros(0, dtype=torch.int64)
        self._deadline = torch.zeros(0, dtype=torch.int64)
        self._masked_macs = 0
        self._last_iteration = -1
        self._num_updates = 0
        self._last_choice: MaskChoice | None = None
        self._optimizer_ref: weakref.ReferenceType[torch.optim.Optimizer] | None = None

    # -- setup -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Pick the convs (engine units), build the cost model, insert identity compactors in place."""
        if self.units:
            raise MslimError("ResRepPruner.prepare() was already called on this model")
        model = self._model
        if any(isinstance(m, Compactor) for m in model.modules()):
            raise GraphError(
                "the model already holds ResRep compactors; pass the original model (to resume, prepare the "
                "original and load the wrapped model's state_dict into session.model)"
            )
        _, units, self.skipped = select_units(
            model, self.example_inputs, self.config.ignored_layers, self.config.include_stem
        )
        if not units:
            reasons = "; ".join(f"{n}: {r}" for n, r in list(self.skipped.items())[:8])
            raise GraphError(f"ResRep found no conv it can put a compactor after ({reasons or 'no conv layers'})")
        self.cost = CostModel(model, self.example_inputs, units)
        self.original_cost = count_cost(model, self.example_inputs)
        self._widths = self.cost.initial_widths()
        self.original_macs = int(self.cost.macs(self._widths))
        self.units = insert_compactors(model, units)
        self.bank = CompactorBank([u.compactor for u in self.units])
        self._masked_at = torch.full((self.bank.num_rows,), -1, dtype=torch.int64)
        self._deadline = torch.full((self.bank.num_rows,), -1, dtype=torch.int64)
        self._masked_macs = self.original_macs
        self._warn_if_unreachable(stacklevel=5)

    @property
    def target_macs(self) -> float:
        """MACs the mask schedule aims at: ``flops_target`` times the original MACs."""
        return self.config.flops_target * self.original_macs

    def schedule_cost(self) -> CostModel | RoundedCost:
        """The cost model the mask schedule counts with: with ``round_to`` > 1, as ``finalize`` will round."""
        assert self.cost is not None
        if self.config.round_to == 1:
            return self.cost
        return RoundedCost(self.cost, self._widths, self.config.round_to)

    def smallest_reachable_ratio(self) -> float:
        """FLOPs ratio with every compacted layer at its floor (``num_at_least``, rounded up to ``round_to``)."""
        assert self.cost is not None
        step = self.config.round_to
        floor = math.ceil(self.config.num_at_least / step) * step
        widths = self._widths.clamp_max(floor)
        return int(self.cost.macs(widths)) / self.original_macs if self.original_macs else 1.0

    def _warn_if_unreachable(self, stacklevel: int) -> None:
        """Warn now (not after hours of training) when the per-layer floor makes ``flops_target`` unreachable."""
        smallest = self.smallest_reachable_ratio()
        if smallest <= self.config.flops_target:
            return
        floor = f"num_at_least={self.config.num_at_least}"
        if self.config.round_to > 1:
            floor += f" rounded up to round_to={self.config.round_to}"
        warnings.warn(
            f"flops_target {self.config.flops_target} is not reachable: with every one of the {len(self.units)} "
            f"compacted layers at {floor} channels the smallest reachable FLOPs ratio is {smallest:.4f} "
            "(layers without a compactor keep their width); lower num_at_least or raise flops_target",
            TargetNotReachedWarning,
            stacklevel=stacklevel,
        )

    def configure(self, **changes: Any) -> None:
        """Change options after ``prepare`` (validated together; the schedule is re-resolved, masks kept).

        ``ignored_layers`` and ``include_stem`` decide where the compactors are and cannot change.
        """
        self._require_prepared()
        data = self.config.model_dump()
        fixed = [k for k in ("ignored_layers", "include_stem") if k in changes and changes[k] != data[k]]
        if fixed:
            raise ConfigError(
                f"option {fixed[0]!r} decides where the compactors go and cannot change after prepare "
                f"(it is {data[fixed[0]]!r}, got {changes[fixed[0]]!r}); prepare the model again"
            )
        old_target = self.config.flops_target
        try:
            config = type(self.config).model_validate({**data, **changes})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(self.name, type(self.config), exc)) from None
        self.config = config
        self.schedule = resolve_schedule(config)
        self._refresh_masks()
        if config.flops_target != old_target:
            self._warn_if_unreachable(stacklevel=3)

    def set_example_inputs(self, example_inputs: Any) -> None:
        """Count FLOPs on other example inputs (e.g. the real image size); compactors, masks and weights stay.

        The cost model and ``original_cost`` are rebuilt on the model with the compactors taken out
        for the duration of the call.
        """
        self._require_prepared()
        inputs = as_input_tuple(example_inputs)
        model = self._model
        wrappers = {u.wrapper_name: model.get_submodule(u.wrapper_name) for u in self.units}
        for name, wrapper in wrappers.items():
            _set_child(model, name, wrapper.layer)
        try:
            _, units, _ = select_units(model, inputs, self.config.ignored_layers, self.config.include_stem)
            found = [(u.name, int(u.channels)) for u in units]
            if found != [(u.name, u.channels) for u in self.units]:
                raise GraphError(
                    f"on example inputs of shape {[tuple(t.shape) for t in inputs]} ResRep would put compactors "
                    f"after {len(found)} other convs than the {len(self.units)} it has; prepare with these inputs"
                )
            cost = CostModel(model, inputs, units)
            original = count_cost(model, inputs)
        finally:
            for name, wrapper in wrappers.items():
                _set_child(model, name, wrapper)
        self.cost, self.original_cost, self.example_inputs = cost, original, inputs
        self.original_macs = int(cost.macs(self._widths))
        self._refresh_masks()

    def _require_prepared(self) -> CompactorBank:
        if self.bank is None:
            raise MslimError("ResRepPruner.prepare() has not been called (use mslim.prepare(...))")
        return self.bank

    # -- optimizer ---------------------------------------------------------------------------

    def param_groups(self, lr: float, momentum: float, weight_decay: float) -> list[dict[str, Any]]:
        """Groups 'decay', 'no_decay' (norms, biases, depthwise convs) and 'compactor' (momentum 0.99, no decay)."""
        bank = self._require_prepared()
        compactor_ids = {id(p) for p in bank.params}
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        seen: set[int] = set()
        for module in self.model.modules():
            for pname, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen or id(param) in compactor_ids:
                    continue
                seen.add(id(param))
                if isinstance(module, _NORM_TYPES) or pname == "bias" or _is_depthwise(module):
                    no_decay.append(param)
                else:
                    decay.append(param)
        groups = [
            {"params": decay, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "lr": lr, "momentum": momentum, "weight_decay": 0.0, "name": "no_decay"},
            {
                "params": [p for p in bank.params if p.requires_grad],
                "lr": lr,
                "momentum": self.config.compactor_momentum,
                "weight_decay": 0.0,
                "name": COMPACTOR_GROUP,
            },
        ]
        return [g for g in groups if g["params"]]

    def optimizer(
        self, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False
    ) -> torch.optim.Optimizer:
        """SGD over ``param_groups``; the pruner keeps a weak reference to clear zeroed rows' momentum."""
        opt = super().optimizer(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.attach_optimizer(opt)
        return opt

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Tell the pruner which optimizer steps the compactors (for an optimizer built elsewhere).

        Proximal zeroing scales that optimizer's per-weight state (e.g. SGD momentum) with the rows it
        shrinks, so momentum never pushes a zeroed row away from zero.
        """
        self._optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None

    @property
    def attached_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose state follows the zeroed rows, if any is still alive."""
        return self._optimizer_ref() if self._optimizer_ref is not None else None

    def plan(self, total_iters: int, iters_per_epoch: int | None = None) -> None:
        """Tell the schedule how long training will be, for options the user left unset.

        A training loop that knows its length (epochs * batches per epoch) calls this before the first
        step, so the proximal zeroing is planned without the user passing ``total_iters``.
        Explicit ``total_iters`` / ``iters_per_epoch`` options are never overridden.
        """
        if self.config.total_iters is None:
            self.config.total_iters = int(total_iters)
        if iters_per_epoch is not None and self.config.iters_per_epoch is None:
            self.config.iters_per_epoch = int(iters_per_epoch)
        self.schedule = resolve_schedule(self.config)
        if self.bank is not None:
            self._refresh_masks()

    # -- training hooks ----------------------------------------------------------------------

    def after_backward(self) -> None:
        """Compactor gradients = mask * grad + lasso * Q / ||Q_row|| (under AMP: after ``scaler.unscale_``)."""
        reset_gradients(self._require_prepared(), self.config.lasso_strength)

    def step(self, iteration: int) -> None:
        """After the optimizer step of ``iteration``: shrink masked rows (proximal), then maybe update masks."""
        bank = self._require_prepared()
        self._last_iteration = iteration
        if self.schedule.proximal and bool((self._masked_at >= 0).any()):
            self._shrink_masked_rows(bank, iteration)
        if self.schedule.is_update(iteration):
            self.update_masks(iteration)

    def _shrink_masked_rows(self, bank: CompactorBank, iteration: int) -> None:
        """Linear shrink of each masked row to exactly zero at its deadline; zero rows stay zero."""
        masked = self._masked_at >= 0
        remaining = (self._deadline - iteration + 1).clamp_min(1).to(torch.float64)
        scale = torch.where(masked, (remaining - 1.0) / remaining, torch.ones_like(remaining))
        bank.scale_rows(scale, self.attached_optimizer)

    def update_masks(self, iteration: int) -> MaskChoice:
        """Rebuild the masks from the current row norms (spec section 3); called by ``step`` on schedule."""
        bank = self._require_prepared()
        assert self.cost is not None
        masked_before = self._masked_at >= 0
        proximal = self.schedule.proximal
        choice = choose_masked_rows(
            norms=bank.row_norms(),
            layer_of_row=bank.layer_of_row,
            widths=self._widths,
            cost=self.schedule_cost(),
            target_macs=self.target_macs,
            num_at_least=self.config.num_at_least,
            current=int(masked_before.sum()),
            granularity=self.config.begin_granularity,
            updates_left=self.schedule.updates_left(iteration) if self.schedule.planned else None,
            forced=masked_before if proximal else None,
        )
        masked = _broadcast_from_rank0(choice.masked, bank.params[0].device)
        newly = masked & ~masked_before
        self._masked_at[newly] = iteration
        self._masked_at[~masked] = -1
        self._refresh_masks()
        self._num_updates += 1
        self._last_choice = choice
        return choice

    def _refresh_masks(self) -> None:
        """Deadlines, gradient mask and predicted MACs from ``_masked_at``."""
        bank = self._require_prepared()
        assert self.cost is not None
        masked = self._masked_at >= 0
        deadline = self._masked_at + self.schedule.zeroing_iters
        if self.schedule.zero_by_iter is not None:
            deadline = deadline.clamp_max(self.schedule.zero_by_iter)
        self._deadline = torch.where(masked, deadline, torch.full_like(deadline, -1))
        bank.set_row_mask(~masked)
        per_layer = torch.bincount(bank.layer_of_row[masked], minlength=len(self.units))
        self._masked_macs = int(self.schedule_cost().macs(self._widths - per_layer))

    # -- queries -----------------------------------------------------------------------------

    @property
    def compactors(self) -> dict[str, Compactor]:
        """Compactor of each compacted conv, by the conv's qualified name in the original model."""
        return {u.name: u.compactor for u in self.units}

    def masks(self) -> dict[str, torch.Tensor]:
        """Per compacted conv: a float mask per output channel (1 = task gradient flows, 0 = masked)."""
        bank = self._require_prepared()
        keep = (self._masked_at < 0).to(torch.float32)
        return {u.name: m.clone() for u, m in zip(self.units, bank.split_rows(keep))}

    def masked_rows(self) -> int:
        """Number of masked compactor rows."""
        return int((self._masked_at >= 0).sum())

    def _zeroed_mask(self) -> torch.Tensor:
        """Per row: masked and past its proximal deadline (held at exactly zero)."""
        if not self.schedule.proximal:
            return torch.zeros_like(self._masked_at, dtype=torch.bool)
        return (self._masked_at >= 0) & (self._deadline <= self._last_iteration)

    def zeroed_rows(self) -> int:
        """Number of masked rows whose proximal deadline has passed (exactly zero)."""
        return int(self._zeroed_mask().sum())

    def progress(self) -> dict[str, float]:
        """``flops_ratio``: MACs with the masked channels removed / original MACs; masked and zeroed row counts."""
        if self.bank is None or not self.original_macs:
            return {}
        return {
            "flops_ratio": self._masked_macs / self.original_macs,
            "masked": float(self.masked_rows()),
            "zeroed": float(self.zeroed_rows()),
        }

    # -- finalize ----------------------------------------------------------------------------

    def finalize(self) -> tuple[nn.Module, PruneReport]:
        """Fold BN and compactors into the convs, remove rows below ``threshold``; returns a new model."""
        bank = self._require_prepared()
        assert self.cost is not None and self.original_cost is not None
        flat_norms = bank.row_norms().cpu()
        # rows the proximal schedule has zeroed count as zero even if the weights were replaced since
        # (e.g. by an EMA copy, which only approaches zero)
        flat_norms[self._zeroed_mask()] = 0.0
        norms = bank.split_rows(flat_norms)
        result = convert(
            self._model,
            self.units,
            self.example_inputs,
            norms,
            self.cost,
            threshold=self.config.threshold,
            round_to=self.config.round_to,
            ignored_layers=self.config.ignored_layers,
            check=self.config.check_equivalence,
        )
        masked = bank.split_rows(self._masked_at >= 0)
        above = sum(int(((n >= self.config.threshold) & m).sum()) for n, m in zip(norms, masked))
        below_unmasked = sum(int(((n < self.config.threshold) & ~m).sum()) for n, m in zip(norms, masked))
        report_warnings: list[str] = []
        before = self.original_cost
        ratio = result.macs_after / before.macs if before.macs else 1.0
        if ratio > self.config.flops_target:
            msg = (
                f"FLOPs ratio {ratio:.4f} is above flops_target {self.config.flops_target}: "
                f"{above} masked row(s) still have a norm >= threshold {self.config.threshold:g}"
            )
            if self.schedule.proximal and self.schedule.zero_by_iter is None:
                msg += "; pass total_iters so the zeroing of masked rows is planned to finish in time"
            elif not self.schedule.proximal:
                msg += "; zeroing='proximal' drives masked rows to exactly zero on short schedules"
            report_warnings.append(msg)
            warnings.warn(msg, TargetNotReachedWarning, stacklevel=2)
        if result.predicted_macs != result.macs_after:
            report_warnings.append(
                f"the cost model predicted {result.predicted_macs} MACs, the converted model has {result.macs_after}"
            )
        report = PruneReport(
            algorithm=self.name,
            config=self.config.model_dump(mode="json"),
            flops_target=self.config.flops_target,
            macs_before=before.macs,
            macs_after=result.macs_after,
            params_before=before.params,
            params_after=result.params_after,
            layer_widths={u.name: (u.channels, int(result.kept[u.name].sum())) for u in self.units},
            max_output_diff=result.max_output_diff,
            warnings=report_warnings,
            extra={
                "predicted_macs": result.predicted_macs,
                "max_output_rel_diff": result.max_output_rel_diff,
                "equivalence_rel_diff": result.equivalence_rel_diff,
                "compacted_layers": len(self.units),
                "masked_rows": self.masked_rows(),
                "masked_rows_above_threshold": above,
                "unmasked_rows_removed": below_unmasked,
                "zero_rows_kept_for_constants": result.kept_nonzero_constant,
                "removed_rows": sum(int((~k).sum()) for k in result.kept.values()),
                "iteration": self._last_iteration + 1,
                "mask_updates": self._num_updates,
                "removals": result.removal_history,
                "skipped_layers": dict(self.skipped),
            },
        )
        return result.model, report

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks (as the iteration each row was masked at, -1 = not masked), iteration, update count, config."""
        self._require_prepared()
        return {
            "version": STATE_VERSION,
            "units": [u.name for u in self.units],
            "widths": [u.channels for u in self.units],
            "masked_at": self._masked_at.clone(),
            "last_iteration": self._last_iteration,
            "num_updates": self._num_updates,
            "config": self.config.model_dump(mode="json"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks and schedule position; the compacted layers must be the same."""
        bank = self._require_prepared()
        if not isinstance(state, dict) or "masked_at" not in state:
            raise CheckpointError("not a resrep pruner state (no 'masked_at' entry)")
        if int(state.get("version", 0)) > STATE_VERSION:
            raise CheckpointError(f"resrep state version {state.get('version')} is newer than {STATE_VERSION}")
        names = [u.name for u in self.units]
        if list(state.get("units", [])) != names or list(state.get("widths", [])) != [u.channels for u in self.units]:
            raise CheckpointError(
                "the resrep state was saved for other compacted layers "
                f"({len(state.get('units', []))} layers) than this model has ({len(names)}): "
                "prepare the same architecture with the same ignored_layers / include_stem"
            )
        masked_at = torch.as_tensor(state["masked_at"], dtype=torch.int64).cpu()
        if masked_at.shape != (bank.num_rows,):
            raise CheckpointError(f"masked_at has shape {tuple(masked_at.shape)}, expected ({bank.num_rows},)")
        self._masked_at = masked_at.clone()
        self._last_iteration = int(state.get("last_iteration", -1))
        self._num_updates = int(state.get("num_updates", 0))
        self._refresh_masks()
