"""MobileNetV2 adapted to 32x32 inputs (stride-1 stem and first 24-channel stage; total stride 8)."""

from __future__ import annotations

import torch
from torch import nn

from .common import ConvBNAct, init_weights

# (expansion t, output channels c, repeats n, first stride s); strides set for 32x32 inputs.
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6, skipped when t=1) -> 3x3 depthwise (ReLU6) -> 1x1 linear project; residual add
    when stride is 1 and channels match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand: nn.Module = (
            ConvBNAct(in_channels, hidden, 1, act=nn.ReLU6) if expansion != 1 else nn.Identity()
        )
        self.depthwise = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.project = ConvBNAct(hidden, out_channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """3x3 stem (32 ch) -> 17 inverted residual blocks -> 1x1 conv to 1280 -> avgpool -> fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, last_channels: int = 1280) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(in_channels, 32, 3, 1, act=nn.ReLU6)]
        c = 32
        for t, out, n, s in CIFAR_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers.append(ConvBNAct(c, last_channels, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    """CIFAR MobileNetV2 (width 1.0)."""
    return MobileNetV2(num_classes, in_channels)
