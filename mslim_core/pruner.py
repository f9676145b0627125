"""The ``Pruner`` base class: the lifecycle every algorithm plugin implements.

``prepare()`` wraps or instruments the model; during training ``after_backward()`` shapes
gradients and ``step()`` advances the schedule; ``finalize()`` physically removes
channels and returns the smaller model with a report. One-shot algorithms only
implement ``finalize()``.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

import torch
from torch import nn

from mslim_core.config import PrunerConfig
from mslim_core.errors import ConfigError
from mslim_core.report import PruneReport
from mslim_core.tracing import as_input_tuple

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def resolve_layer_names(model: nn.Module, layers: list[Any]) -> list[str]:
    """Turn a list of layer names or modules into qualified names, checking that each exists."""
    by_module = {id(m): n for n, m in model.named_modules()}
    names = set(by_module.values())
    resolved: list[str] = []
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in by_module:
                raise ConfigError(
                    f"ignored_layers holds a {type(layer).__name__} module that is not part of the model"
                )
            resolved.append(by_module[id(layer)])
        elif isinstance(layer, str):
            if layer not in names:
                close = difflib.get_close_matches(layer, sorted(names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"ignored_layers names {layer!r}, which is not a layer of the model{hint}")
            resolved.append(layer)
        else:
            raise ConfigError(
                f"ignored_layers entries must be layer names or modules, got {type(layer).__name__}: {layer!r}"
            )
    return resolved


class Pruner:
    """Base class of every pruning algorithm; subclasses set ``name``, ``Config`` and override hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[PrunerConfig]] = PrunerConfig
    trains: ClassVar[bool] = False
    """True when the algorithm needs training steps (after_backward/step) before finalize."""

    def __init__(self, model: nn.Module, example_inputs: Any, config: PrunerConfig) -> None:
        self.config = config
        self.example_inputs = as_input_tuple(example_inputs)
        self.config.ignored_layers = resolve_layer_names(model, list(config.ignored_layers))
        self._model = model

    @classmethod
    def summary(cls) -> str:
        """One line describing the algorithm (``description`` or the docstring's first line)."""
        if cls.description:
            return cls.description
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @property
    def model(self) -> nn.Module:
        """The model to train (possibly wrapped by ``prepare``)."""
        return self._model

    def prepare(self) -> None:
        """Wrap or instrument ``self.model`` before training; the default does nothing."""

    def param_groups(self, lr: float, momentum: float, weight_decay: float) -> list[dict[str, Any]]:
        """SGD parameter groups; the default exempts norm layers and biases from weight decay."""
        decay, no_decay = [], []
        for module in self.model.modules():
            for pname, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if isinstance(module, _NORM_TYPES) or pname == "bias":
                    no_decay.append(param)
                else:
                    decay.append(param)
        groups = [
            {"params": decay, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "lr": lr, "momentum": momentum, "weight_decay": 0.0, "name": "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    def plan(self, total_iters: int, iters_per_epoch: int | None = None) -> None:
        """Learn the training run's length before the first step; the default ignores it.

        A trainer that knows its length calls this; algorithms whose schedule depends on it (ResRep's
        proximal zeroing) fill in the options the user left unset and never override explicit ones.
        """

    def after_backward(self) -> None:
        """Shape gradients after ``loss.backward()`` and before ``optimizer.step()``."""

    def step(self, iteration: int) -> None:
        """Advance the schedule after the optimizer step of ``iteration`` (0-based)."""

    def progress(self) -> dict[str, float]:
        """Figures worth showing while training (e.g. the current expected FLOPs ratio)."""
        return {}

    def finalize(self) -> tuple[nn.Module, PruneReport]:
        """Remove channels for good; return the smaller model and a report."""
        raise NotImplementedError(f"pruner {self.name!r} does not implement finalize()")

    def state_dict(self) -> dict[str, Any]:
        """Everything the schedule needs to resume (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def optimizer(
        self, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False
    ) -> torch.optim.Optimizer:
        """An SGD optimizer over ``param_groups`` (the reference setup of every built-in algorithm)."""
        groups = self.param_groups(lr=lr, momentum=momentum, weight_decay=weight_decay)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
