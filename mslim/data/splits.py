"""The result of loading a dataset (train/test tensors plus what a model needs to know) and split helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mslim_core.errors import DataError

__all__ = ["DatasetSplits", "channel_stats", "stratified_split", "check_images_labels", "to_float_images"]


@dataclass
class DatasetSplits:
    """Train and test tensors of one dataset with its class count, input shape and normalisation.

    Images are ``N x C x H x W``, uint8 (0-255) or float (used as is); labels are int64.
    ``mean``/``std`` are per channel on the [0, 1] scale the loaders feed to models.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    default_augment: bool = False
    source: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        """Number of image channels (1 for grey, 3 for RGB)."""
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width."""
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input."""
        return (self.in_channels, *self.image_size)

    def example_input(self, batch: int = 1) -> Tensor:
        """A zero float batch of the model's input shape, for tracing and cost counting."""
        return torch.zeros(batch, *self.input_shape)

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return (f"DatasetSplits({self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"classes={self.num_classes}, input={c}x{h}x{w})")


def to_float_images(images: Tensor) -> Tensor:
    """uint8 images become float32 in [0, 1]; float images become float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``images`` on the loader's [0, 1] scale, in chunks to bound memory.

    A channel with zero spread gets std 1 so normalising never divides by zero.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"cannot compute channel statistics of images with shape {tuple(images.shape)}")
    channels = images.shape[1]
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if images.dtype == torch.uint8:
        # exact and fast: a 256-bin histogram per channel (a loop over channels at load time only)
        values = torch.arange(256, dtype=torch.float64) / 255.0
        hist = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(channels)])
        hist = hist.to(torch.float64)
        mean = hist @ values / count
        var = (hist @ values.square() / count - mean.square()).clamp_min(0.0)
    else:
        total = torch.zeros(channels, dtype=torch.float64)
        total_sq = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, images.shape[0], chunk):
            part = images[start:start + chunk].to(torch.float64)
            total += part.sum(dim=(0, 2, 3))
            total_sq += part.square().sum(dim=(0, 2, 3))
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic stratified split: indices (sorted) of train and test, ``round(n_c * test_fraction)`` per class.

    The same labels, fraction and seed always give the same split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    labels = labels.to(torch.int64)
    n = labels.numel()
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    # group by class, keeping the random order within each class
    order = perm[torch.sort(labels[perm], stable=True).indices]
    sorted_labels = labels[order]
    classes, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(n) - torch.repeat_interleave(starts, counts)
    n_test = torch.round(counts.to(torch.float64) * test_fraction).to(torch.int64)
    is_test = rank_in_class < torch.repeat_interleave(n_test, counts)
    test_idx = torch.sort(order[is_test]).values
    train_idx = torch.sort(order[~is_test]).values
    return train_idx, test_idx


def check_images_labels(images: Tensor, labels: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """Validate an images/labels pair (4-D uint8 or float images, 1-D integer labels of equal length).

    Returns the images and the labels as int64; raises DataError naming ``where`` otherwise.
    """
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise DataError(f"{where}: images and labels must be tensors, got "
                        f"{type(images).__name__} and {type(labels).__name__}")
    if images.ndim != 4:
        raise DataError(f"{where}: images must be N x C x H x W, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise DataError(f"{where}: images must be uint8 or floating point, got {images.dtype}")
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise DataError(f"{where}: labels must be a 1-D integer tensor, got {labels.dtype} "
                        f"with shape {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    labels = labels.to(torch.int64)
    if labels.numel() and int(labels.min()) < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(labels.min())}")
    return images, labels
