"""The pruning schedule of ``taylor``: intermediate FLOPs targets and when each round happens."""

from __future__ import annotations

from dataclasses import dataclass

from mslim_core.errors import ConfigError

__all__ = ["RoundSchedule", "round_targets"]


def round_targets(flops_target: float, steps: int, kind: str = "geometric") -> list[float]:
    """FLOPs ratio to reach after each of ``steps`` rounds, ending exactly at ``flops_target``.

    ``geometric``: ``flops_target ** (k / steps)`` (each round removes the same fraction of what
    is left); ``linear``: ``1 - (1 - flops_target) * k / steps`` (the same amount every round).
    """
    if steps < 1:
        raise ConfigError(f"pruning_steps = {steps!r} is invalid; allowed: an integer >= 1")
    if kind == "geometric":
        targets = [flops_target ** (k / steps) for k in range(1, steps + 1)]
    elif kind == "linear":
        targets = [1.0 - (1.0 - flops_target) * k / steps for k in range(1, steps + 1)]
    else:
        raise ConfigError(f"schedule {kind!r} is unknown; allowed: geometric, linear")
    targets[-1] = float(flops_target)
    return targets


@dataclass(frozen=True)
class RoundSchedule:
    """When rounds happen (every ``interval`` iterations) and which iterations feed their scores.

    ``interval`` None: no round during training; every round runs in ``finalize`` and scores
    are accumulated over all iterations. ``window``: iterations accumulated before each round
    (at most ``interval``).
    """

    steps: int
    interval: int | None
    window: int | None

    @classmethod
    def from_options(
        cls, steps: int, interval: int | None, total_iters: int | None, accumulate_iters: int | None
    ) -> RoundSchedule:
        """``interval`` as given, else ``total_iters // (steps + 1)`` (fine-tuning follows the last round)."""
        if interval is None and total_iters is not None:
            interval = max(1, total_iters // (steps + 1))
        window = None
        if interval is not None:
            window = interval if accumulate_iters is None else min(accumulate_iters, interval)
        return cls(steps=steps, interval=interval, window=window)

    def round_due(self, completed: int, rounds_done: int) -> bool:
        """Whether a round is due once ``completed`` iterations have finished."""
        if self.interval is None or rounds_done >= self.steps:
            return False
        return completed >= (rounds_done + 1) * self.interval

    def accumulates(self, iteration: int, rounds_done: int) -> bool:
        """Whether iteration ``iteration`` (0-based) adds to the scores of the next round."""
        if rounds_done >= self.steps:
            return False
        if self.interval is None or self.window is None:
            return True
        return iteration >= (rounds_done + 1) * self.interval - self.window

    def round_iterations(self) -> list[int]:
        """Completed-iteration counts after which the rounds happen (empty without an interval)."""
        if self.interval is None:
            return []
        return [k * self.interval for k in range(1, self.steps + 1)]
