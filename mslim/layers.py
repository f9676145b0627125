"""Per-layer view of a model: type, input/output channels, MACs and parameters of every layer.

Used by ``mslim info`` and by the before/after chart of ``mslim demo``. MACs come from the
analytic counter (``mslim_core.cost``): convs and linears only, on one sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mslim_core.cost import layer_costs

__all__ = ["LayerRow", "layer_rows", "output_widths"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class LayerRow:
    """One layer: qualified name, module type, channels in and out, MACs on one sample, own parameters."""

    name: str
    type: str
    in_channels: int | None
    out_channels: int | None
    macs: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


def _channels(module: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features, module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_channels
    return None, None


def layer_rows(model: nn.Module, example_inputs: Any) -> list[LayerRow]:
    """Every conv, linear, norm or other parameter-holding leaf layer the example inputs reach, in order."""
    costs = layer_costs(model, example_inputs)
    rows: list[LayerRow] = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        counted = name in costs
        if not (counted or own or isinstance(module, _NORMS)):
            continue
        cin, cout = _channels(module)
        rows.append(LayerRow(name or "(model)", type(module).__name__, cin, cout,
                             costs[name].macs if counted else 0, own))
    return rows


def output_widths(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Output channels of every conv/linear layer the example inputs reach, by qualified name."""
    return {name: shape.out_features for name, shape in layer_costs(model, example_inputs).items()}
