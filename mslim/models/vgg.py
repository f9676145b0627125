"""CIFAR VGG-16 with batch norm: 13 conv-BN-ReLU layers in 5 pooled stages, then a 2-layer classifier."""

from __future__ import annotations

import torch
from torch import nn

from .common import ConvBNAct, init_weights

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG(nn.Module):
    """Plain conv stack (features) + global avgpool + flatten + Linear-ReLU-Linear classifier."""

    def __init__(
        self,
        layout: tuple[int | str, ...] = VGG16_LAYOUT,
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(ConvBNAct(c, int(item), 3))
                c = int(item)
        self.features = nn.Sequential(*layers)
        # A 32x32 input reaches 1x1 after five pools; the avgpool lets other sizes work too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """CIFAR VGG-16 with BN."""
    return VGG(VGG16_LAYOUT, num_classes, in_channels)
