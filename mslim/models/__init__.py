"""The model zoo: small reference networks to prune, by name.

``create("resnet56")`` builds a model, ``example_input("resnet56")`` gives a matching random batch,
``available()`` lists the names.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mslim_core.errors import MslimError

from .cifar_resnet import BasicBlock, CifarResNet, resnet20, resnet56, resnet110
from .common import ConvBNAct, init_weights
from .densenet import DenseNet, densenet
from .imagenet_resnet import Bottleneck, ResNet50, resnet50
from .mobilenet_v2 import InvertedResidual, MobileNetV2, mobilenet_v2
from .vgg import VGG, vgg16_bn
from .yolo_elan import ELAN, SPPCSPC, MPDown, RepConv, YoloElan, yolo_elan

__all__ = [
    "ModelInfo",
    "available",
    "create",
    "example_input",
    "info",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ConvBNAct",
    "DenseNet",
    "ELAN",
    "InvertedResidual",
    "MPDown",
    "MobileNetV2",
    "RepConv",
    "ResNet50",
    "SPPCSPC",
    "VGG",
    "YoloElan",
    "init_weights",
]


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo knows about one model: its builder, its example input side and its task."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: int
    task: str  # "classification" (output (B, num_classes)) or "detection" (3 maps, strides 8/16/32)
    summary: str


_REGISTRY: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo("resnet20", resnet20, 32, "classification", "CIFAR ResNet-20, 9 basic blocks"),
        ModelInfo("resnet56", resnet56, 32, "classification", "CIFAR ResNet-56, 27 basic blocks"),
        ModelInfo("resnet110", resnet110, 32, "classification", "CIFAR ResNet-110, 54 basic blocks"),
        ModelInfo("vgg16_bn", vgg16_bn, 32, "classification", "CIFAR VGG-16 with batch norm"),
        ModelInfo("mobilenet_v2", mobilenet_v2, 32, "classification", "CIFAR MobileNetV2"),
        ModelInfo("resnet50", resnet50, 64, "classification", "ImageNet-shape ResNet-50, 16 bottlenecks"),
        ModelInfo("densenet", densenet, 32, "classification", "small CIFAR DenseNet-BC (growth 12)"),
        ModelInfo("yolo_elan", yolo_elan, 128, "detection", "YOLOv7-style detector at width 0.25"),
    )
}


def available() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def info(name: str) -> ModelInfo:
    """The registry entry for `name`; raises MslimError (with the closest name) when unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    names = available()
    close = difflib.get_close_matches(str(name).lower(), names, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise MslimError(f"unknown model {name!r}.{hint} Available models: {', '.join(names)}")


def _check_positive(label: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MslimError(f"{label} must be a positive integer, got {value!r}")
    return value


def create(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: object) -> nn.Module:
    """Build the named model with a `num_classes` classifier/heads and an `in_channels` first conv.

    Extra keyword options go to the model's builder (e.g. ``width`` for yolo_elan, ``growth`` for densenet).
    """
    entry = info(name)
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    params = inspect.signature(entry.builder).parameters
    options = [p for p in params if p not in ("num_classes", "in_channels")]
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        allowed = ", ".join(options) if options else "none"
        raise MslimError(f"model {name!r} has no option {unknown[0]!r}; its extra options: {allowed}")
    return entry.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def example_input(name: str, batch: int = 1, in_channels: int = 3) -> torch.Tensor:
    """A random (batch, in_channels, S, S) input valid for the named model (S: 32 for CIFAR models,
    64 for resnet50, 128 for yolo_elan)."""
    entry = info(name)
    _check_positive("batch", batch)
    _check_positive("in_channels", in_channels)
    return torch.randn(batch, in_channels, entry.input_size, entry.input_size)
