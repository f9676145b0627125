"""Keep optimizers valid across a physical channel removal in the middle of training.

Removing channels replaces every affected parameter by a new, smaller ``nn.Parameter``
(torch-pruning builds new parameters from ``index_select`` of the old ones). An optimizer
built before still holds the old parameters and their state (momentum buffers, Adam
moments) at the old shapes. :func:`follow_removal` wraps the removal: beforehand it
stores every parameter and writes into it the flat position of each element (as float64,
exact for any realistic size); whatever removal does, the new parameter then holds the
positions of the elements that survived, in their new order. Afterwards the real values,
the gradients and every optimizer state tensor shaped like the parameter are gathered at
those positions, and the optimizers' ``param_groups`` are re-pointed to the new parameters,
in place (the same optimizer objects keep working).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["follow_removal"]


@contextmanager
def follow_removal(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> Iterator[None]:
    """Run a channel removal on ``model`` inside this block; afterwards values, gradients and the
    optimizers' per-parameter state follow the surviving elements, and the optimizers use the new
    parameters. Nothing inside the block may read or change parameter values."""
    optimizers = list(optimizers)
    saved: dict[str, tuple[nn.Parameter, Tensor, Tensor | None]] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            saved[name] = (param, param.data, param.grad)
            param.grad = None
            param.data = torch.arange(param.numel(), dtype=torch.float64, device=param.device).view(param.shape)
    try:
        yield
    finally:
        with torch.no_grad():
            _restore(model, saved, optimizers)


def _restore(
    model: nn.Module,
    saved: dict[str, tuple[nn.Parameter, Tensor, Tensor | None]],
    optimizers: list[torch.optim.Optimizer],
) -> None:
    current = dict(model.named_parameters())
    replaced: dict[int, tuple[nn.Parameter, Tensor, torch.Size]] = {}  # id(old) -> (new, positions, old shape)
    for name, (old, data, grad) in saved.items():
        new = current.get(name, old)
        if new is old and new.shape == data.shape:
            new.data = data
            new.grad = grad
            continue
        positions = new.data.reshape(-1).to(torch.long)
        new.data = data.reshape(-1)[positions].view(new.shape)
        new.grad = None if grad is None else grad.reshape(-1)[positions].view(new.shape)
        if new is not old:
            old.data = data  # whoever still holds the old parameter sees its real values
        replaced[id(old)] = (new, positions, data.shape)
    if not replaced:
        return
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [replaced[id(p)][0] if id(p) in replaced else p for p in group["params"]]
        for old in [p for p in list(optimizer.state) if id(p) in replaced]:
            new, positions, shape = replaced[id(old)]
            state = optimizer.state.pop(old)
            optimizer.state[new] = {
                key: (
                    value.reshape(-1)[positions.to(value.device)].view(new.shape)
                    if isinstance(value, Tensor) and value.shape == shape
                    else value
                )
                for key, value in state.items()
            }
