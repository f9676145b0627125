"""Small helpers for running a model on example inputs without changing it."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mslim_core.errors import GraphError

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Normalise example inputs (a tensor, or a tuple/list of tensors) to a tuple; reject others."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise GraphError(
        "example_inputs must be a tensor shaped like one batch of model input "
        f"(e.g. torch.randn(1, 3, 32, 32)) or a tuple of such tensors, got {type(example_inputs).__name__}"
    )


def first_sample(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """A batch-1 slice of the example inputs (graph building and cost counting need one sample)."""
    return tuple(t[:1] if t.dim() > 0 else t for t in as_input_tuple(example_inputs))


@contextlib.contextmanager
def preserved_modes(model: nn.Module, train: bool | None = None) -> Iterator[nn.Module]:
    """Temporarily set train/eval mode (or leave it), restoring every submodule's own mode after."""
    modes = {m: m.training for m in model.modules()}
    try:
        if train is not None:
            model.train(train)
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """Forward the example inputs in eval mode without gradients; a failure becomes a GraphError."""
    inputs = as_input_tuple(example_inputs)
    with preserved_modes(model, train=False), torch.no_grad():
        try:
            return model(*inputs)
        except Exception as exc:  # the model's own error, re-raised with the shapes that caused it
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
            raise GraphError(
                f"the model failed on example_inputs of shape {shapes}: {type(exc).__name__}: {exc}. "
                "Pass example inputs shaped like one batch of real model input."
            ) from exc
