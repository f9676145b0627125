"""``PruningSession``: drives one pruner through a user's training loop, with resumable state."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mslim_core.config import PrunerConfig
from mslim_core.errors import CheckpointError, MslimError
from mslim_core.pruner import Pruner
from mslim_core.report import PruneReport

STATE_FORMAT = 1


class PruningSession:
    """What ``mslim.prepare`` returns: the model to train and the calls to make around each step."""

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner
        self.iteration = 0
        self.finalized = False
        pruner.prepare()

    @property
    def algorithm(self) -> str:
        """The algorithm's registered name."""
        return self.pruner.name

    @property
    def config(self) -> PrunerConfig:
        """The validated configuration."""
        return self.pruner.config

    @property
    def model(self) -> nn.Module:
        """The model to train (wrapped or instrumented by the algorithm)."""
        return self.pruner.model

    @property
    def trains(self) -> bool:
        """Whether the algorithm needs training steps before ``finalize``."""
        return self.pruner.trains

    def optimizer(
        self, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False
    ) -> torch.optim.Optimizer:
        """SGD with the algorithm's parameter groups (e.g. its own momentum or decay rules)."""
        return self.pruner.optimizer(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    def after_backward(self) -> None:
        """Call after ``loss.backward()`` and before ``optimizer.step()``."""
        self._check_open()
        self.pruner.after_backward()

    def step(self) -> None:
        """Call once per iteration after ``optimizer.step()``: advances the schedule."""
        self._check_open()
        self.pruner.step(self.iteration)
        self.iteration += 1

    def progress(self) -> dict[str, float]:
        """Figures for a progress bar, e.g. ``{"flops_ratio": 0.62}``."""
        return self.pruner.progress()

    def finalize(self) -> tuple[nn.Module, PruneReport]:
        """Remove channels for good; returns the smaller model and a report. Only once."""
        self._check_open()
        model, report = self.pruner.finalize()
        self.finalized = True
        return model, report

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (not the model's weights), loadable with ``weights_only=True``."""
        return {
            "format": STATE_FORMAT,
            "algorithm": self.algorithm,
            "config": self.config.model_dump(mode="json"),
            "iteration": self.iteration,
            "pruner": self.pruner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict``; the algorithm must match."""
        if not isinstance(state, dict) or "algorithm" not in state:
            raise CheckpointError("session state is not a mslim session state (no 'algorithm' key)")
        if state.get("format", 0) > STATE_FORMAT:
            raise CheckpointError(
                f"session state has format {state['format']}, newer than this mslim understands ({STATE_FORMAT})"
            )
        if state["algorithm"] != self.algorithm:
            raise CheckpointError(
                f"session state is for algorithm {state['algorithm']!r}, this session runs {self.algorithm!r}"
            )
        self.iteration = int(state["iteration"])
        self.pruner.load_state_dict(state["pruner"])

    def _check_open(self) -> None:
        if self.finalized:
            raise MslimError("this session is already finalized; call mslim.prepare() again to prune anew")
