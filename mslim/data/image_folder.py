"""Datasets stored as image files, one subfolder per class: ``root/train/<class>/<image>.png|jpg``.

Images are decoded once with Pillow (an optional dependency) into a uint8 tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mslim_core.errors import DataError

from .splits import DatasetSplits, channel_stats, stratified_split

__all__ = ["load_image_folder", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_LAYOUT = "PATH/train/<class>/<image>.png|jpg and PATH/val/<class>/... (or test/)"


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError("folder: reading image folders needs Pillow, which is not installed "
                        "(pip install pillow), or convert the images to a 'tensors:' .pt file") from exc
    return Image


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _scan(split_dir: Path, class_names: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """Image files and their class indices under ``split_dir``; class names come from it unless given."""
    dirs = _class_dirs(split_dir)
    names = class_names if class_names is not None else [d.name for d in dirs]
    index = {name: i for i, name in enumerate(names)}
    files: list[Path] = []
    labels: list[int] = []
    for class_dir in dirs:
        if class_dir.name not in index:
            raise DataError(f"folder: class folder {class_dir} has no counterpart in the training classes "
                            f"({', '.join(names)})")
        found = _image_files(class_dir)
        files.extend(found)
        labels.extend([index[class_dir.name]] * len(found))
    if not files:
        raise DataError(f"folder: no images ({'|'.join(IMAGE_SUFFIXES)}) in class subfolders of {split_dir}; "
                        f"expected {_LAYOUT}")
    return files, labels, names


def _decode(files: list[Path], size: int | None) -> Tensor:
    Image = _pil_image()
    loaded = []
    for file in files:
        try:
            with Image.open(file) as img:
                img.load()
                loaded.append(img.copy())
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"folder: cannot read image {file}: {exc}") from exc
    mode = "L" if all(img.mode in _GREY_MODES for img in loaded) else "RGB"
    first_size = loaded[0].size
    arrays = []
    for file, img in zip(files, loaded):
        img = img.convert(mode)
        if size is not None:
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
        elif img.size != first_size:
            raise DataError(f"folder: {file} is {img.size[0]}x{img.size[1]} but {files[0]} is "
                            f"{first_size[0]}x{first_size[1]}; make them equal or pass size=")
        arrays.append(np.asarray(img, dtype=np.uint8))
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[:, None]
    else:
        stacked = stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def load_image_folder(path: str | Path, size: int | None = None, seed: int = 0,
                      test_fraction: float = 0.2) -> DatasetSplits:
    """Load ``PATH/train/<class>/*`` and ``PATH/val`` (or ``PATH/test``) as uint8 tensors.

    Without train/ the class folders directly under PATH are split stratified by ``seed``.
    All images must share one size unless ``size`` resizes them to ``size x size``.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"folder: no such folder: {root}; expected {_LAYOUT}")
    train_dir = root / "train"
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if train_dir.is_dir():
        if test_dir is None:
            raise DataError(f"folder: {root} has train/ but neither val/ nor test/; expected {_LAYOUT}")
        train_files, train_labels, names = _scan(train_dir, None)
        test_files, test_labels, _ = _scan(test_dir, names)
        images = _decode(train_files + test_files, size)
        labels = torch.tensor(train_labels + test_labels, dtype=torch.int64)
        cut = len(train_files)
        train_x, train_y, test_x, test_y = images[:cut], labels[:cut], images[cut:], labels[cut:]
    else:
        if not any(p.is_dir() for p in root.iterdir()):
            raise DataError(f"folder: {root} is empty or holds no class folders; expected {_LAYOUT}")
        files, file_labels, names = _scan(root, None)
        images = _decode(files, size)
        labels = torch.tensor(file_labels, dtype=torch.int64)
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
        train_x, train_y, test_x, test_y = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    mean, std = channel_stats(train_x)
    return DatasetSplits(name="folder", train_images=train_x, train_labels=train_y, test_images=test_x,
                         test_labels=test_y, num_classes=len(names), mean=mean, std=std,
                         class_names=tuple(names), default_augment=False, source=str(root))
