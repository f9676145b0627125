"""A small pruner defined in the tests to exercise the base classes, config and dispatch."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from mslim_core import PruneReport, Pruner, PrunerConfig, hookimpl


class ToyConfig(PrunerConfig):
    scale: float = Field(1.0, gt=0, description="Factor applied to every gradient.")
    keep_first: int = Field(1, ge=1, description="Output channels the last conv keeps.")


def _macs_free_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ToyPruner(Pruner):
    """Scales gradients while training, then keeps only the first channels of the last conv."""

    name = "toy"
    Config = ToyConfig
    trains = True

    def __init__(self, model: nn.Module, example_inputs: Any, config: ToyConfig) -> None:
        super().__init__(model, example_inputs, config)
        self.steps_seen = 0
        self.planned: tuple[int, int | None] | None = None

    def plan(self, total_iters: int, iters_per_epoch: int | None = None) -> None:
        self.planned = (total_iters, iters_per_epoch)

    def after_backward(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, self.config.scale)

    def step(self, iteration: int) -> None:
        self.steps_seen = iteration + 1

    def progress(self) -> dict[str, float]:
        return {"steps": float(self.steps_seen)}

    def finalize(self) -> tuple[nn.Module, PruneReport]:
        before = _macs_free_count(self.model)
        return self.model, PruneReport(
            algorithm=self.name,
            config=self.config.model_dump(mode="json"),
            macs_before=before,
            macs_after=before,
            params_before=before,
            params_after=before,
            extra={"steps_seen": self.steps_seen},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen = int(state["steps_seen"])


class ToyPlugin:
    """An in-process plugin object registering the toy pruner."""

    @hookimpl
    def mslim_register_pruners(self, register):
        register(ToyPruner)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    )
