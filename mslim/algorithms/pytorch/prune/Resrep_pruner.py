# ruff: noqa: N999 - the module name is the seed's
"""ResRep's seed API (``ResRep``, ``calculate_model_flops``, ``Resrep_1``, ``Resrep_2``) over a pruning session.

Code written against the seed document runs unchanged::

    ResRep_object = ResRep(copy.deepcopy(model))
    model = ResRep_object.wrapped_model
    ResRep_object.original_flops = calculate_model_flops(model, dummy_input, ResRep_object)
    optimizer = ResRep_object.sgd_optimizer(hyp["momentum"])
    for epoch in range(epochs):
        for i, (input, target) in enumerate(train_loader):
            model, iteration, compactor_mask_dict = Resrep_1(opt, iteration, model, ResRep_object, epoch, num_images)
            loss = criterion(model(input), target)
            loss.backward()
            Resrep_2(opt, compactor_mask_dict)
            optimizer.step()          # the seed document's snippet leaves this line out
            optimizer.zero_grad()

Nothing here is a second implementation: ``ResRep`` holds the session of
``mslim.prepare(model, algo="resrep", ...)``; ``Resrep_1`` is ``session.step()`` for the previous
iteration (the seed advances its schedule at the start of an iteration, the session after the
optimizer step: the same sequence of operations) and ``Resrep_2`` is ``session.after_backward()``.
Options come from the seed scripts' argparse namespace ``opt``: every attribute named like a
ResRep option (``flops_target``, ``lasso_strength``, ``begin_granularity``, ``num_at_least``,
``mask_interval``, ``threshold``, ...) is applied, validated; missing ones keep the paper's defaults.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import mslim
from mslim_core.checkpoint import unwrap_parallel
from mslim_core.cost import count_cost
from mslim_core.errors import ConfigError, GraphError, MslimError, MslimWarning
from mslim_core.report import PruneReport
from mslim_core.session import PruningSession
from mslim_core.tracing import as_input_tuple

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_INPUT_SHAPE",
    "CompactorMaskDict",
    "ResRep",
    "Resrep_1",
    "Resrep_2",
    "calculate_model_flops",
]

DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)
"""Example input used when ``ResRep`` gets none (CIFAR size); replaced by ``calculate_model_flops``'s
dummy input or, on the first ``Resrep_1``, by one of ``opt.img_size``."""

DEFAULT_BATCH_SIZE = 64
"""Batch size assumed when ``opt`` has neither ``batch_size`` nor ``total_batch_size`` (the paper's)."""

_PLACEMENT_OPTIONS = ("ignored_layers", "include_stem")
"""Options that decide where compactors go: given to ``ResRep(...)``, never read from ``opt``."""


class CompactorMaskDict(dict):  # type: ignore[type-arg]
    """``{compactor weight (nn.Parameter): float mask of the weight's shape (D, D, 1, 1)}``, as in the seed.

    A row of zeros masks an output channel of the compactor (1 = the task gradient flows). The seed's
    loop ``param.grad = mask * param.grad + lasso`` works on it; ``owner`` is the ``ResRep`` it came from.
    """

    owner: ResRep


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    return next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)


def _default_input(model: nn.Module, side: int | None = None) -> torch.Tensor:
    """A fixed random batch-1 input on the model's device and dtype (random: finalize's checks need variation)."""
    shape = DEFAULT_INPUT_SHAPE if side is None else (1, 3, side, side)
    ref = _first_tensor(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return x.to(device=ref.device, dtype=ref.dtype) if ref is not None else x


def _image_side(img_size: Any) -> int | None:
    """``opt.img_size`` as one side length: an int, or the first of a list (YOLOv7's ``[train, test]``)."""
    if isinstance(img_size, Sequence) and not isinstance(img_size, str):
        img_size = img_size[0] if img_size else None
    if img_size is None:
        return None
    try:
        side = int(img_size)
    except (TypeError, ValueError):
        raise ConfigError(f"opt.img_size must be an int or a list of ints, got {img_size!r}") from None
    if side < 1:
        raise ConfigError(f"opt.img_size must be positive, got {img_size!r}")
    return side


class ResRep:
    """The seed's ResRep object: inserts compactors now, holds the session; ``wrapped_model`` is what to train.

    ``example_inputs`` is optional: without it a 1x3x32x32 input is used until ``calculate_model_flops``
    or ``opt.img_size`` gives the real one. ``config``: ResRep options (``mslim.prepare`` keywords).
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, **config: Any) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"ResRep needs a torch.nn.Module, got {type(model).__name__}")
        if model is not unwrap_parallel(model):
            raise ConfigError("pass the plain model to ResRep and wrap ResRep(...).wrapped_model in DDP afterwards")
        self.default_input = example_inputs is None
        if example_inputs is None:
            example_inputs = _default_input(model)
        try:
            self.session: PruningSession = mslim.prepare(model, algo="resrep", example_inputs=example_inputs, **config)
        except GraphError as exc:
            if not self.default_input or "failed on example_inputs" not in str(exc):
                raise
            raise GraphError(
                f"ResRep(model) without example_inputs tries a {DEFAULT_INPUT_SHAPE} input, and the model fails on "
                f"it ({exc}); pass ResRep(model, example_inputs=x) with x shaped like one batch of real input"
            ) from exc
        self._original_flops: int | None = None
        self._opt_seen: dict[str, Any] = {}
        self._planned = False
        self._mask_key: torch.Tensor | None = None
        self._mask_dict: CompactorMaskDict | None = None

    # -- the seed's attributes ------------------------------------------------------------------

    @property
    def pruner(self) -> Any:
        """The session's ``ResRepPruner`` (units, compactors, masks, schedule)."""
        return self.session.pruner

    @property
    def wrapped_model(self) -> nn.Module:
        """The model with compactors (``session.model``): train this one."""
        return self.session.model

    @property
    def original_flops(self) -> int:
        """MACs of the model before compactors, on the current example input (the FLOPs target's reference)."""
        return self._original_flops if self._original_flops is not None else int(self.pruner.original_macs)

    @original_flops.setter
    def original_flops(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"original_flops must be a positive number, got {value!r}")
        counted = int(self.pruner.original_macs)
        if abs(value - counted) > 1e-3 * counted:
            warnings.warn(
                f"original_flops = {value} differs from the {counted} MACs mslim counts on the example input of "
                f"shape {self.input_shape}; the FLOPs target is measured with mslim's count (set it from "
                "calculate_model_flops(model, dummy_input, ResRep_object))",
                MslimWarning,
                stacklevel=2,
            )
        self._original_flops = int(value)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of the (first) example input FLOPs are counted on."""
        return tuple(self.pruner.example_inputs[0].shape)

    def sgd_optimizer(
        self, momentum: float = 0.9, lr: float = 0.01, weight_decay: float = 1e-4, nesterov: bool = False
    ) -> torch.optim.Optimizer:
        """SGD with ResRep's groups (compactors: momentum 0.99, no decay; no decay on BN, biases, depthwise)."""
        return self.session.optimizer(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
                                      nesterov=nesterov)

    # -- options and masks ----------------------------------------------------------------------

    def apply_options(self, opt: Any) -> None:
        """Apply every attribute of ``opt`` named like a ResRep option (not None) that changed since last call."""
        fields = type(self.session.config).model_fields
        changes = {
            name: getattr(opt, name)
            for name in fields
            if name not in _PLACEMENT_OPTIONS
            and getattr(opt, name, None) is not None
            and (name not in self._opt_seen or self._opt_seen[name] != getattr(opt, name))
        }
        if changes:
            self.pruner.configure(**changes)
            self._opt_seen.update(changes)

    def plan_from(self, opt: Any, num_images: int) -> None:
        """Derive iterations per epoch (``num_images`` / batch) and, with ``opt.epochs``, the planned length.

        ``num_images`` is what this process's loader visits per epoch (``train_loader.sampler.__len__()``)
        and ``opt.batch_size`` this process's batch; ``opt.total_batch_size`` is divided by the world size.
        """
        batch = getattr(opt, "batch_size", None)
        if batch is None and getattr(opt, "total_batch_size", None) is not None:
            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            batch = max(1, int(opt.total_batch_size) // world)
        batch = DEFAULT_BATCH_SIZE if batch is None else int(batch)
        if batch < 1 or int(num_images) < 1:
            raise ConfigError(f"Resrep_1 needs num_images >= 1 and a batch size >= 1, got {num_images!r} and {batch!r}")
        per_epoch = math.ceil(int(num_images) / batch)
        epochs = getattr(opt, "epochs", None)
        if epochs is not None:
            self.pruner.plan(int(epochs) * per_epoch, per_epoch)
        elif self.session.config.iters_per_epoch is None:
            self.pruner.configure(iters_per_epoch=per_epoch)
        self._planned = True

    def compactor_mask_dict(self) -> CompactorMaskDict:
        """The current masks keyed by compactor weight (rebuilt only when the masks changed)."""
        key = self.pruner.bank.row_mask
        if self._mask_dict is None or self._mask_key is None or not torch.equal(key, self._mask_key):
            result = CompactorMaskDict()
            for compactor, mask in zip(self.pruner.compactors.values(), self.pruner.masks().values()):
                weight = compactor.weight
                result[weight] = mask.to(device=weight.device, dtype=weight.dtype).view(-1, 1, 1, 1).expand_as(weight)
            result.owner = self
            self._mask_dict, self._mask_key = result, key
        return self._mask_dict

    # -- the end --------------------------------------------------------------------------------

    def finalize(self, threshold: float | None = None) -> tuple[nn.Module, PruneReport]:
        """Fold BN and compactors into the convs and remove rows below ``threshold`` (the seed's prune step)."""
        if threshold is not None:
            self.pruner.configure(threshold=threshold)
        ref = _first_tensor(self.wrapped_model)
        if ref is not None:
            self.pruner.example_inputs = tuple(t.to(ref.device) for t in self.pruner.example_inputs)
        return self.session.finalize()

    def state_dict(self) -> dict[str, Any]:
        """The session's state (masks, schedule position, options): plain data for a checkpoint."""
        return self.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (for resuming a run)."""
        self.session.load_state_dict(state)
        self._mask_dict = None


def _check_model(model: nn.Module, obj: ResRep, caller: str) -> None:
    if unwrap_parallel(model) is not obj.wrapped_model:
        raise MslimError(
            f"{caller} got a model that is not ResRep_object.wrapped_model (or a DDP wrapper of it): "
            "train the wrapped model (model = ResRep_object.wrapped_model)"
        )


def calculate_model_flops(model: nn.Module, dummy_input: Any, ResRep_object: ResRep | None = None) -> int:
    """MACs of ``model`` on ``dummy_input``; with the ResRep object, the wrapped model's MACs without compactors
    and with the masked channels removed, and ``dummy_input`` becomes the input FLOPs are counted on."""
    if ResRep_object is None:
        return int(count_cost(unwrap_parallel(model), dummy_input).macs)
    _check_model(model, ResRep_object, "calculate_model_flops")
    pruner = ResRep_object.pruner
    inputs = as_input_tuple(dummy_input)
    if [tuple(t.shape) for t in inputs] != [tuple(t.shape) for t in pruner.example_inputs]:
        pruner.set_example_inputs(tuple(t.detach() for t in inputs))
    ResRep_object.default_input = False
    widths = torch.tensor([int(m.sum()) for m in pruner.masks().values()], dtype=torch.int64)
    return int(pruner.cost.macs(widths))


def Resrep_1(
    opt: Any,
    iteration: int,
    model: nn.Module,
    ResRep_object: ResRep,
    epoch: int,
    num_images: int,
    logger: Any = None,
    device: Any = None,
    flag: Any = None,
) -> tuple[nn.Module, int, CompactorMaskDict]:
    """Start of a training iteration: finish the previous one's schedule step; returns (model, iteration + 1, masks).

    ``iteration`` counts the iterations started so far (0 at the start, the value returned last time,
    the saved value on resume). ``epoch``, ``device`` and ``flag`` are accepted for the seed's
    signature; the warm-up is ``before_mask_epochs`` (5) epochs of ``num_images / opt.batch_size`` iterations.
    """
    obj = ResRep_object
    if not isinstance(obj, ResRep):
        raise ConfigError(f"Resrep_1 needs the ResRep object, got {type(obj).__name__}")
    _check_model(model, obj, "Resrep_1")
    session = obj.session
    obj.apply_options(opt)
    if not obj._planned:
        side = _image_side(getattr(opt, "img_size", None))
        if obj.default_input and side is not None and (1, 3, side, side) != obj.input_shape:
            obj.pruner.set_example_inputs(_default_input(obj.wrapped_model, side))
        obj.default_input = False
        obj.plan_from(opt, num_images)
    iteration = int(iteration)
    if iteration == session.iteration + 1:
        masked_before = obj.pruner.masked_rows()
        session.step()
        if logger is not None and obj.pruner.masked_rows() != masked_before:
            figures = session.progress()
            logger.info(
                f"resrep iteration {session.iteration}: {int(figures['masked'])} masked rows, "
                f"{int(figures['zeroed'])} zeroed, FLOPs ratio {figures['flops_ratio']:.4f}"
            )
    elif iteration != session.iteration:
        raise MslimError(
            f"Resrep_1 got iteration={iteration}, but the ResRep object has finished {session.iteration} iterations: "
            "pass the iteration Resrep_1 returned last time (0 at the start; on resume the saved value, with the "
            "ResRep state loaded from the same checkpoint)"
        )
    return model, iteration + 1, obj.compactor_mask_dict()


def Resrep_2(opt: Any, compactor_mask_dict: CompactorMaskDict) -> CompactorMaskDict:
    """After ``loss.backward()``: compactor gradients = mask * grad + lasso_strength * Q / ||Q_row||.

    Under AMP call ``scaler.unscale_(optimizer)`` first. The optimizer step stays the caller's.
    """
    owner = getattr(compactor_mask_dict, "owner", None)
    if not isinstance(owner, ResRep):
        raise ConfigError("Resrep_2 needs the compactor_mask_dict that Resrep_1 returned")
    owner.apply_options(opt)
    owner.session.after_backward()
    return compactor_mask_dict
