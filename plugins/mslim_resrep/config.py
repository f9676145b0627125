"""ResRep's options: the paper's defaults, plus the short-schedule mechanism (``zeroing``).

Every number here is documented in ``docs/algorithms/resrep.md``. ``resolve_schedule`` turns
the options into the concrete iteration numbers the mask schedule and the zeroing use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from mslim_core.config import PrunerConfig

__all__ = ["DEFAULT_BEFORE_MASK_ITERS", "ResRepConfig", "ResolvedSchedule", "resolve_schedule"]

DEFAULT_BEFORE_MASK_ITERS = 3905
"""Warm-up used when neither ``before_mask_iters``, ``iters_per_epoch`` nor ``total_iters`` is known:
5 epochs of CIFAR-10 at batch 64 (5 * 50000 // 64), the reference setting."""

MAX_PLANNED_WARMUP = 0.2
"""With ``total_iters`` and proximal zeroing, a warm-up derived from epochs is capped at this fraction of it."""

MIN_PLANNED_UPDATES = 50
"""With ``total_iters`` and proximal zeroing, the masking ramp gets at least this many mask updates."""


class ResRepConfig(PrunerConfig):
    """Options of the ``resrep`` algorithm (defaults: the reference setup of the paper)."""

    flops_target: float = Field(
        0.471,
        gt=0.0,
        le=1.0,
        description="Fraction of the original FLOPs (MACs) to keep; 0.471 (52.9% fewer) is the paper's "
        "ResNet-56 setting.",
    )
    lasso_strength: float = Field(
        1e-4, ge=0.0, description="Group-lasso strength added to every compactor row's gradient (lambda)."
    )
    before_mask_iters: int | None = Field(
        None,
        ge=0,
        description="Iterations before the first mask update. None: before_mask_epochs * iters_per_epoch "
        "(at most 20% of total_iters when the zeroing is planned), else 5% of total_iters, else 3905 "
        "(5 CIFAR-10 epochs at batch 64).",
    )
    before_mask_epochs: float = Field(
        5.0, ge=0.0, description="Warm-up in epochs; used with iters_per_epoch when before_mask_iters is None."
    )
    iters_per_epoch: int | None = Field(
        None, ge=1, description="Training iterations per epoch (for before_mask_epochs)."
    )
    mask_interval: int = Field(200, ge=1, description="Iterations between two mask updates.")
    begin_granularity: int = Field(
        4, ge=1, description="At most this many more channels are masked per update while above the target."
    )
    num_at_least: int = Field(1, ge=1, description="Every compacted layer keeps at least this many channels.")
    threshold: float = Field(
        1e-5, ge=0.0, description="At finalize, compactor rows with an L2 norm below this are removed."
    )
    include_stem: bool = Field(False, description="Also put a compactor after the conv that reads the model input.")
    round_to: int = Field(
        1,
        ge=1,
        description="At finalize, each compacted layer keeps a multiple of this many channels (keeping the "
        "strongest rows that would go); 1 disables rounding.",
    )
    compactor_momentum: float = Field(0.99, ge=0.0, lt=1.0, description="SGD momentum of the compactor weights.")
    total_iters: int | None = Field(
        None,
        ge=1,
        description="Planned number of training iterations. With zeroing='proximal' the masking ramp and "
        "the zeroing of masked rows are planned to finish within it (short schedules).",
    )
    zeroing: Literal["proximal", "none"] = Field(
        "proximal",
        description="'proximal': masked rows are shrunk after each optimizer step until exactly zero, and "
        "kept there (masks only grow); 'none': the paper's plain behaviour (masked rows decay through the "
        "lasso and the learning-rate schedule alone; masks are rebuilt from scratch at each update).",
    )
    ramp_end: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="With total_iters and proximal zeroing: fraction of total_iters by which masking should "
        "reach flops_target (the per-update growth is raised above begin_granularity as needed).",
    )
    zero_by: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="With total_iters and proximal zeroing: fraction of total_iters by which every masked "
        "row is exactly zero; the rest of training adapts the network to its final shape.",
    )
    zeroing_iters: int | None = Field(
        None,
        ge=1,
        description="Iterations a masked row takes to shrink linearly to exactly zero. None: "
        "(zero_by - ramp_end) * total_iters with total_iters, else 20 * mask_interval.",
    )

    @field_validator("zero_by")
    @classmethod
    def _zero_after_ramp(cls, value: float, info: ValidationInfo) -> float:
        ramp_end = info.data.get("ramp_end")
        if ramp_end is not None and value < ramp_end:
            raise ValueError(
                f"zero_by ({value}) must be at least ramp_end ({ramp_end}): masked rows can only be "
                "zero after masking has reached the target"
            )
        return value


@dataclass(frozen=True)
class ResolvedSchedule:
    """The concrete iteration numbers derived from a ``ResRepConfig``."""

    start: int
    """First iteration at which masks are updated."""
    interval: int
    """Iterations between mask updates."""
    planned: bool
    """True when total_iters and proximal zeroing plan the ramp (adaptive growth per update)."""
    ramp_end_iter: int | None
    """Iteration by which masking should reach the target (planned mode)."""
    zero_by_iter: int | None
    """Iteration by which every masked row must be zero (planned mode)."""
    zeroing_iters: int
    """Length of the linear shrink of one masked row (proximal mode)."""
    proximal: bool

    def is_update(self, iteration: int) -> bool:
        """Whether the masks are rebuilt after the optimizer step of ``iteration``."""
        return iteration >= self.start and (iteration - self.start) % self.interval == 0

    def updates_left(self, iteration: int) -> int:
        """Mask updates from ``iteration`` (included) up to the ramp's end (at least 1)."""
        if self.ramp_end_iter is None or iteration > self.ramp_end_iter:
            return 1
        return max(1, (self.ramp_end_iter - iteration) // self.interval + 1)


def resolve_schedule(config: ResRepConfig) -> ResolvedSchedule:
    """Warm-up, interval, ramp end, zeroing deadline and shrink length from the options."""
    total = config.total_iters
    if config.before_mask_iters is not None:
        start = config.before_mask_iters
    elif config.iters_per_epoch is not None:
        start = int(round(config.before_mask_epochs * config.iters_per_epoch))
    elif total is not None:
        start = int(round(0.05 * total))
    else:
        start = DEFAULT_BEFORE_MASK_ITERS
    proximal = config.zeroing == "proximal"
    planned = proximal and total is not None
    if planned and config.before_mask_iters is None:
        assert total is not None
        start = min(start, int(round(MAX_PLANNED_WARMUP * total)))  # leave the ramp room on short schedules
    interval = config.mask_interval
    ramp_end_iter = zero_by_iter = None
    if planned:
        assert total is not None
        ramp_end_iter = max(start, int(math.floor(config.ramp_end * total)) - 1)
        zero_by_iter = max(ramp_end_iter, int(math.floor(config.zero_by * total)) - 1)
        window = ramp_end_iter - start
        interval = max(1, min(interval, window // MIN_PLANNED_UPDATES))
        default_zeroing = max(1, zero_by_iter - ramp_end_iter)
    else:
        default_zeroing = 20 * config.mask_interval
    zeroing_iters = config.zeroing_iters if config.zeroing_iters is not None else default_zeroing
    return ResolvedSchedule(
        start=start,
        interval=interval,
        planned=planned,
        ramp_end_iter=ramp_end_iter,
        zero_by_iter=zero_by_iter,
        zeroing_iters=zeroing_iters,
        proximal=proximal,
    )
