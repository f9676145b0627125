"""The built-in fusion rules, registered as a plugin through the ``mslim_register_fusers`` hook.

conv+BN (1-D/2-D/3-D, grouped and depthwise), linear+BN1d (on 2-D activations) and
conv followed by a 1x1 conv (only when folding does not add MACs).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mslim_core.fusion import FusionRule, fuse_conv_bn, fuse_conv_conv1x1, fuse_linear_bn, is_pointwise
from mslim_core.hookspecs import hookimpl

__all__ = ["BUILTIN_RULES", "mslim_register_fusers"]


def _bn_foldable(modules: tuple[nn.Module, ...], shapes: tuple[torch.Size, ...]) -> bool:
    first, bn = modules
    out = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    return bool(bn.track_running_stats and bn.running_var is not None and bn.num_features == out)


def _linear_bn_foldable(modules: tuple[nn.Module, ...], shapes: tuple[torch.Size, ...]) -> bool:
    # BatchNorm1d normalises dim 1; a linear's features are the last dim: same only for 2-D activations
    return _bn_foldable(modules, shapes) and shapes[0] is not None and len(shapes[0]) == 2


def _conv1x1_foldable(modules: tuple[nn.Module, ...], shapes: tuple[torch.Size, ...]) -> bool:
    conv, pw = modules
    if not is_pointwise(pw) or pw.in_channels != conv.out_channels:
        return False
    # MACs per output position: fused cin*c2*K against cin/g*c1*K + c1*c2 unfused
    k = math.prod(conv.kernel_size)
    fused = conv.in_channels * pw.out_channels * k
    unfused = conv.in_channels // conv.groups * conv.out_channels * k + conv.out_channels * pw.out_channels
    return fused <= unfused


def _rule(name: str, pattern: tuple[type[nn.Module], ...], fuse: Callable[..., nn.Module], description: str,
          condition: Callable[[tuple[nn.Module, ...], tuple[torch.Size, ...]], bool]) -> FusionRule:
    return FusionRule(name=name, pattern=pattern, fuse=fuse, description=description, condition=condition)


BUILTIN_RULES: tuple[FusionRule, ...] = (
    *(
        _rule(f"conv{d}d_bn", (conv, bn), fuse_conv_bn, f"Conv{d}d followed by BatchNorm{d}d", _bn_foldable)
        for d, conv, bn in (
            (1, nn.Conv1d, nn.BatchNorm1d),
            (2, nn.Conv2d, nn.BatchNorm2d),
            (3, nn.Conv3d, nn.BatchNorm3d),
        )
    ),
    _rule("linear_bn", (nn.Linear, nn.BatchNorm1d), fuse_linear_bn, "Linear followed by BatchNorm1d",
          _linear_bn_foldable),
    *(
        _rule(f"conv{d}d_conv1x1", (conv, conv), fuse_conv_conv1x1,
              f"Conv{d}d followed directly by a 1x1 Conv{d}d (groups 1, stride 1, no padding)", _conv1x1_foldable)
        for d, conv in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d))
    ),
)


@hookimpl
def mslim_register_fusers(register: Callable[[FusionRule], None]) -> None:
    """Register the built-in fusion rules."""
    for rule in BUILTIN_RULES:
        register(rule)
