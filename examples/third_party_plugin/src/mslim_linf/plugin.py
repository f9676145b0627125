"""Hook implementation: registers the ``linf`` importance criterion with mslim."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from mslim_core import hookimpl
from mslim_core.importance import Importance, filter_rows


class LInfNorm(Importance):
    """Largest absolute weight of each filter: a filter with one strong weight is kept."""

    name = "linf"
    description = "max |w| over each filter's weights"

    def layer_scores(self, module: nn.Module, name: str) -> Tensor:
        return filter_rows(module).abs().amax(dim=1)


@hookimpl
def mslim_register_importances(register: Callable[[Importance], None]) -> None:
    """Make ``importance="linf"`` available to every pruner that ranks channels."""
    register(LInfNorm())
