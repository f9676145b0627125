"""``SlimmingPruner``: network slimming (Liu et al., ICCV 2017).

While training, ``after_backward`` adds the sub-gradient of ``sparsity * sum |gamma|`` (an L1
penalty on the scales of the norm layers of every prunable unit) to the gradients of those
scales, so the scales of unneeded channels drift towards zero. ``finalize`` ranks channels by
``|gamma|`` (the ``bn_scale`` criterion), removes the weakest through the engine until the
FLOPs target is met, checks the smaller model against the trained one with those channels
zeroed, and reports. Units without a norm layer with a scale are not pruned (and reported);
units whose channels are tied by grouped convs or a ``chunk()`` lose whole channel sets.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from mslim_core.errors import CheckpointError
from mslim_core.graph import ChannelGraph, Unit
from mslim_core.importance import Importance, get_importance
from mslim_core.pruner import Pruner
from mslim_core.selection import SelectionConfig
from mslim_core.report import PruneReport
from mslim_core.oneshot import prune_by_importance, tied_sets_problem

__all__ = ["SlimmingConfig", "SlimmingPruner", "penalised_norms"]

CRITERION = "bn_scale"


class SlimmingConfig(SelectionConfig):
    """Options of ``slimming``: the L1 strength on BN scales, and how channels are chosen at the end."""

    sparsity: float = Field(
        1e-4,
        ge=0.0,
        description="L1 strength lambda on the norm scales: after each backward, lambda * sign(gamma) is "
        "added to their gradients (1e-4 in the paper for VGG on CIFAR, 1e-5 for ResNet and DenseNet).",
    )
    normalize: Literal["none", "mean", "sum", "max"] = Field(
        "none",
        description="How each layer's |gamma| are scaled before the global ranking; 'none' compares raw "
        "scales (the paper), 'mean' divides each layer's scales by their mean.",
    )
    gamma_threshold: float = Field(
        1e-2,
        gt=0.0,
        description="progress() reports the fraction of penalised scales with |gamma| below this value.",
    )


def penalised_norms(graph: ChannelGraph, model: nn.Module, criterion: Importance, prune_coupled: bool) -> list[str]:
    """Names of the norm layers whose scales ``slimming`` penalises and later ranks.

    The norm layers (with a per-channel scale) of every unit ``finalize`` may prune: coupled
    units only with ``prune_coupled``; units whose channels come in tied sets (grouped convs,
    ``chunk``) too, except the unsupported case of both at once, which is not pruned.
    """
    names: list[str] = []
    for unit in graph.units:
        if not _prunable(graph, unit, prune_coupled) or not criterion.applicable(unit, model):
            continue
        for name in criterion.member_names(unit):
            weight = getattr(model.get_submodule(name), "weight", None)
            if isinstance(weight, Tensor) and weight.dim() == 1 and name not in names:
                names.append(name)
    return names


def _prunable(graph: ChannelGraph, unit: Unit, prune_coupled: bool) -> bool:
    return (prune_coupled or unit.independent) and not tied_sets_problem(graph, unit)


class SlimmingPruner(Pruner):
    """Network slimming: L1 on BN scales while training, then prune channels by |gamma| to a FLOPs target."""

    name = "slimming"
    description = "L1 on BN scales while training, then prune by |gamma| to a FLOPs target (Liu et al., 2017)"
    Config = SlimmingConfig
    trains = True

    def __init__(self, model: nn.Module, example_inputs: Any, config: SlimmingConfig) -> None:
        super().__init__(model, example_inputs, config)
        self.criterion = get_importance(CRITERION)
        self.norm_names: list[str] = []
        self._norms: list[nn.Module] = []
        self.steps = 0
        self._result: dict[str, Any] = {}

    def prepare(self) -> None:
        """Find the norm layers of the prunable units (one trace of the model)."""
        config: SlimmingConfig = self.config  # type: ignore[assignment]
        graph = ChannelGraph(self.model, self.example_inputs, ignored_layers=list(config.ignored_layers))
        self.norm_names = penalised_norms(graph, self.model, self.criterion, config.prune_coupled)
        self._norms = [self.model.get_submodule(n) for n in self.norm_names]

    def scales(self) -> list[nn.Parameter]:
        """The penalised scale parameters (``weight`` of each norm layer in ``norm_names``)."""
        return [m.weight for m in self._norms]

    @torch.no_grad()
    def after_backward(self) -> None:
        """Add ``sparsity * sign(gamma)`` to the gradient of every penalised scale, in one fused call."""
        self.steps += 1
        strength = float(self.config.sparsity)  # type: ignore[attr-defined]
        if strength == 0.0:
            return
        weights = [w for w in self.scales() if w.grad is not None]
        if not weights:
            return
        signs = torch._foreach_sign([w.detach() for w in weights])
        torch._foreach_add_([w.grad for w in weights], signs, alpha=strength)

    @torch.no_grad()
    def progress(self) -> dict[str, float]:
        """``small_gamma``: the fraction of penalised scales with ``|gamma| < gamma_threshold``."""
        weights = self.scales()
        if not weights:
            return {}
        flat = torch.cat([w.detach().abs().flatten() for w in weights])
        threshold = float(self.config.gamma_threshold)  # type: ignore[attr-defined]
        return {"small_gamma": float((flat < threshold).float().mean())}

    def finalize(self) -> tuple[nn.Module, PruneReport]:
        """Rank channels by ``|gamma|``, remove the weakest to meet ``flops_target``, self-check, report."""
        config: SlimmingConfig = self.config  # type: ignore[assignment]
        figures = self.progress()
        device = next((p.device for p in self.model.parameters()), None)
        if device is not None:  # the trainer may have moved the model (e.g. to a GPU) since prepare
            self.example_inputs = tuple(t.to(device) if isinstance(t, Tensor) else t for t in self.example_inputs)
        model, report = prune_by_importance(
            self,
            self.criterion,
        )
        report.extra.update(
            {
                "training_steps": self.steps,
                "sparsity": config.sparsity,
                "penalised_norms": list(self.norm_names),
                "small_gamma_before_pruning": figures.get("small_gamma"),
            }
        )
        self._result = {
            "finalized": True,
            "removals": report.extra["removals"],
            "removed_channels": report.extra["removed_channels"],
        }
        return model, report

    def state_dict(self) -> dict[str, Any]:
        """The step count (the penalty itself keeps no state); after ``finalize`` also the removal record."""
        return {"steps": self.steps, "norms": list(self.norm_names), **self._result}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; the penalised layers must be those of this model."""
        norms = state.get("norms")
        if norms is not None and list(norms) != self.norm_names:
            raise CheckpointError(
                f"slimming state penalises norm layers {list(norms)[:5]}..., this session {self.norm_names[:5]}...; "
                "resume with the same model and the same options (ignored_layers, prune_coupled)"
            )
        self.steps = int(state.get("steps", 0))
        self._result = {k: v for k, v in state.items() if k in ("finalized", "removals", "removed_channels")}
