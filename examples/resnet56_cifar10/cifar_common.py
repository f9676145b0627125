"""What the three ResNet-56 / CIFAR-10 scripts share: the data, the device, the learning rate, accuracy."""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from mslim.data import TensorLoader, load_dataset, make_loaders

INPUT_SHAPE = (1, 3, 32, 32)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def cifar_loaders(path: str, batch_size: int, seed: int, device: torch.device) -> tuple[TensorLoader, TensorLoader]:
    """CIFAR-10 from its python-pickle folder (``cifar-10-batches-py`` or its parent): train (crop + flip) and test."""
    splits = load_dataset(f"cifar10:{path}")
    return make_loaders(splits, batch_size, eval_batch_size=max(batch_size, 256), seed=seed, device=device)


def pick_device(name: str) -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cosine_lr(base: float, iteration: int, total: int) -> float:
    """Cosine from ``base`` at iteration 0 to 0 at ``total``, per iteration, no warm-up (the paper's)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / max(total, 1)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def accuracy(model: nn.Module, loader: TensorLoader) -> float:
    """Top-1 accuracy in percent (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    return 100.0 * correct / max(total, 1)
