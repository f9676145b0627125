"""Batched image augmentation on tensors: random crop with zero padding, horizontal flip, normalisation.

Every operation works on a whole ``N x C x H x W`` batch at once (no per-image Python loop) and
draws its randomness from a ``torch.Generator``, so a seed fixes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mslim_core.errors import DataError

__all__ = ["random_crop", "random_hflip", "normalize", "Augmentation", "BatchAugment", "crop_and_flip"]


class Augmentation(Protocol):
    """Anything that maps a float batch and a generator to an augmented batch of the same shape."""

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor: ...


def random_crop(images: Tensor, padding: int, generator: torch.Generator,
                offsets: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Zero-pad each image by ``padding`` and crop it back to its size at a random offset per image.

    Offsets (``dy``, ``dx`` in ``0..2*padding``) are drawn from ``generator`` unless given.
    """
    if padding < 0:
        raise DataError(f"crop padding must be >= 0, got {padding}")
    if padding == 0:
        return images
    n, c, h, w = images.shape
    if offsets is None:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    else:
        dy, dx = offsets
    dy, dx = dy.to(images.device), dx.to(images.device)
    padded = F.pad(images, (padding, padding, padding, padding))
    # two gathers: pick each image's h rows, then its w columns
    rows = (dy[:, None] + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    picked = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))
    cols = (dx[:, None] + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    return picked.gather(3, cols.expand(n, c, h, w))


def random_hflip(images: Tensor, generator: torch.Generator, p: float = 0.5,
                 flips: Tensor | None = None) -> Tensor:
    """Mirror each image left-right with probability ``p`` (or where the boolean ``flips`` is True)."""
    if flips is None:
        flips = torch.rand(images.shape[0], generator=generator) < p
    flips = flips.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flips, images.flip(3), images)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images - mean) / std`` per channel."""
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise DataError(f"normalisation has {len(mean)} means and {len(std)} stds for "
                        f"{images.shape[1]} channels")
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class BatchAugment:
    """Random crop (zero padding ``crop_padding``, 0 = off) then horizontal flip with probability ``flip_p``."""

    crop_padding: int = 4
    flip_p: float = 0.5

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a float batch; the result depends only on the batch and the generator state."""
        out = random_crop(images, self.crop_padding, generator) if self.crop_padding else images
        if self.flip_p > 0:
            out = random_hflip(out, generator, self.flip_p)
        return out


def crop_and_flip(padding: int = 4) -> BatchAugment:
    """The standard CIFAR training augmentation: pad-``padding`` random crop and horizontal flip."""
    return BatchAugment(crop_padding=padding, flip_p=0.5)
