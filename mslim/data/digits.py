"""scikit-learn's bundled 8x8 handwritten digits (1,797 images), split deterministically and stratified."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mslim_core.errors import DataError

from .splits import DatasetSplits, channel_stats, stratified_split

__all__ = ["load_digits"]

_RESIZE_MODES = ("nearest", "bilinear")


def load_digits(seed: int = 0, test_fraction: float = 0.2, size: int | None = None,
                resize_mode: str = "nearest") -> DatasetSplits:
    """Digits as float 1 x 8 x 8 images in [0, 1] with a stratified ``1 - test_fraction`` / ``test_fraction`` split.

    ``size`` (a multiple of 8, e.g. 16 or 32) upscales by ``resize_mode`` ('nearest' or 'bilinear').
    """
    if size is not None and (not isinstance(size, int) or size < 8 or size % 8):
        raise DataError(f"digits: size must be a multiple of 8 (8, 16, 32, ...), got {size!r}")
    if resize_mode not in _RESIZE_MODES:
        raise DataError(f"digits: resize_mode must be one of {', '.join(_RESIZE_MODES)}, got {resize_mode!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("digits: needs scikit-learn (pip install scikit-learn)") from exc
    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if size is not None and size != 8:
        if resize_mode == "nearest":
            images = F.interpolate(images, size=(size, size), mode="nearest")
        else:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    train_x = images[train_idx].contiguous()
    mean, std = channel_stats(train_x)
    return DatasetSplits(name="digits", train_images=train_x, train_labels=labels[train_idx],
                         test_images=images[test_idx].contiguous(), test_labels=labels[test_idx],
                         num_classes=10, mean=mean, std=std, class_names=tuple(str(d) for d in range(10)),
                         default_augment=False, source="sklearn.datasets.load_digits",
                         extra={"seed": seed, "test_fraction": test_fraction})
