"""A small CIFAR DenseNet-BC: dense layers concatenate `growth` new channels onto their input."""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (to 4*growth) -> BN-ReLU-conv3x3 (to growth); output is cat([input, new])."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int = 4) -> None:
        super().__init__()
        mid = bottleneck * growth
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv1(self.relu1(self.bn1(x)))
        new = self.conv2(self.relu2(self.bn2(new)))
        return torch.cat([x, new], dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compressing channels) -> 2x2 avgpool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """3x3 stem (2*growth ch) -> dense blocks separated by transitions -> BN-ReLU -> avgpool -> fc."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        growth: int = 12,
        block_layers: tuple[int, ...] = (6, 6, 6),
        compression: float = 0.5,
    ) -> None:
        super().__init__()
        c = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(block_layers):
            block = []
            for _ in range(n):
                block.append(DenseLayer(c, growth))
                c += growth
            stages.append(nn.Sequential(*block))
            if i < len(block_layers) - 1:
                out = int(c * compression)
                stages.append(Transition(c, out))
                c = out
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def densenet(num_classes: int = 10, in_channels: int = 3, growth: int = 12) -> DenseNet:
    """Small DenseNet-BC for 32x32 inputs: growth 12, three blocks of 6 layers, compression 0.5."""
    return DenseNet(num_classes, in_channels, growth)
