"""Datasets stored as ``.pt`` files holding ``{"images": N x C x H x W, "labels": N}`` (read without pickled code)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mslim_core.errors import DataError

from .splits import DatasetSplits, channel_stats, check_images_labels, stratified_split

__all__ = ["load_tensor_file", "load_tensor_files", "save_tensor_file"]


def load_tensor_file(path: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Read one ``.pt`` file with ``weights_only=True``; return images, int64 labels and the other keys."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"tensors: no such file: {file} (expected a .pt file holding "
                        "{'images': N x C x H x W tensor, 'labels': N int64 tensor})")
    try:
        content = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"tensors: cannot read {file} as a tensor file (only tensors, numbers, strings, "
                        f"lists and dicts are allowed): {first_line}") from exc
    if not isinstance(content, dict) or "images" not in content or "labels" not in content:
        found = ", ".join(map(repr, content)) if isinstance(content, dict) else type(content).__name__
        raise DataError(f"tensors: {file} must hold a dict with 'images' and 'labels'; found: {found}")
    images, labels = check_images_labels(content["images"], content["labels"], f"tensors: {file}")
    extra = {k: v for k, v in content.items() if k not in ("images", "labels")}
    return images, labels, extra


def save_tensor_file(path: str | Path, images: Tensor, labels: Tensor, **extra: Any) -> Path:
    """Write images and labels (plus plain extras such as ``class_names``) as a ``tensors:`` dataset file."""
    images, labels = check_images_labels(images, labels, "save_tensor_file")
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": images.contiguous(), "labels": labels, **extra}, file)
    return file


def _class_names(extra: dict[str, Any], num_classes: int) -> tuple[str, ...] | None:
    names = extra.get("class_names")
    if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def load_tensor_files(train: str | Path, test: str | Path | None = None, seed: int = 0,
                      test_fraction: float = 0.2) -> DatasetSplits:
    """Load a train file and a test file; without a test file, split the train file stratified by ``seed``.

    The class count is the file's ``num_classes`` entry if present, else the largest label + 1.
    """
    train_x, train_y, extra = load_tensor_file(train)
    if test is not None:
        test_x, test_y, _ = load_tensor_file(test)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DataError(f"tensors: test images are {tuple(test_x.shape[1:])} but train images are "
                            f"{tuple(train_x.shape[1:])} ({test} vs {train})")
    else:
        train_idx, test_idx = stratified_split(train_y, test_fraction, seed)
        train_x, train_y, test_x, test_y = train_x[train_idx], train_y[train_idx], train_x[test_idx], train_y[test_idx]
    if train_x.shape[0] == 0:
        raise DataError(f"tensors: {train} holds no training images")
    largest = int(max(train_y.max(), test_y.max() if test_y.numel() else 0))
    num_classes = extra.get("num_classes", largest + 1)
    if not isinstance(num_classes, int) or num_classes <= largest:
        raise DataError(f"tensors: num_classes={num_classes!r} in {train} but labels reach {largest}")
    mean, std = channel_stats(train_x)
    return DatasetSplits(name="tensors", train_images=train_x, train_labels=train_y, test_images=test_x,
                         test_labels=test_y, num_classes=num_classes, mean=mean, std=std,
                         class_names=_class_names(extra, num_classes), default_augment=False,
                         source=str(train) + (f",{test}" if test is not None else ""))
