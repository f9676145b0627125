"""CIFAR-10 and CIFAR-100 read from (and written to) their standard python-pickle folders.

``cifar-10-batches-py/`` holds ``data_batch_1..5``, ``test_batch`` and ``batches.meta``;
``cifar-100-python/`` holds ``train``, ``test`` and ``meta``. Each batch is a pickled dict
with bytes keys (``b'data'``: N x 3072 uint8, rows of 1024 red, 1024 green, 1024 blue values;
``b'labels'`` or ``b'fine_labels'``/``b'coarse_labels'``: lists of ints), read here with a
restricted unpickler.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from mslim_core.errors import DataError

from .safe_pickle import load_numpy_pickle
from .splits import DatasetSplits, channel_stats

__all__ = ["load_cifar10", "load_cifar100", "write_cifar_folder", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    kind: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str


_LAYOUTS = {
    "cifar10": _Layout("cifar10", "cifar-10-batches-py",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta"),
    "cifar100": _Layout("cifar100", "cifar-100-python", ("train",), ("test",), "meta"),
}


def _listing(folder: Path, limit: int = 20) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(nothing)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _find_folder(path: str | Path, layout: _Layout) -> Path:
    """The batch folder: ``path`` itself when it holds the batches, else ``path/<standard name>``."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{layout.kind}: no such folder: {root} (expected the {layout.folder} folder "
                        f"or the folder that contains it)")
    if not root.is_dir():
        raise DataError(f"{layout.kind}: {root} is a file; expected the {layout.folder} folder "
                        f"or the folder that contains it")
    candidates = [root, root / layout.folder] if root.name != layout.folder else [root]
    for folder in candidates:
        if (folder / layout.train_files[0]).is_file():
            break
    else:
        folder = root / layout.folder if (root / layout.folder).is_dir() else root
    required = layout.train_files + layout.test_files
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        expected = ", ".join(required)
        raise DataError(f"{layout.kind}: expected {expected} in {folder} (the {layout.folder} folder "
                        f"or its parent); missing: {', '.join(missing)}; found: {_listing(folder)}")
    return folder


def _get(batch: dict[Any, Any], key: str) -> Any:
    """Look a key up as bytes (files written by Python 2) or as str (re-pickled by Python 3)."""
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _read_batch(file: Path, kind: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = load_numpy_pickle(file)
    except DataError as exc:
        raise DataError(f"{kind}: {exc}") from exc.__cause__
    if not isinstance(batch, dict):
        raise DataError(f"{kind}: {file} holds a {type(batch).__name__}; expected a dict with "
                        f"b'data' and b'{label_key}'")
    data = _get(batch, "data")
    labels = _get(batch, label_key)
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in batch)
        raise DataError(f"{kind}: {file} lacks b'data' or b'{label_key}'; keys found: {keys}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        got = (f"shape {data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__)
        raise DataError(f"{kind}: {file}: b'data' must be an N x {_PIXELS} uint8 array, got {got}")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{kind}: {file}: b'{label_key}' must be a list of integers ({exc})") from exc
    if label_array.ndim != 1 or label_array.shape[0] != data.shape[0]:
        raise DataError(f"{kind}: {file}: {data.shape[0]} images but b'{label_key}' has shape "
                        f"{label_array.shape}")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise DataError(f"{kind}: {file}: b'{label_key}' must lie in 0..{num_classes - 1}, found "
                        f"{int(label_array.min())}..{int(label_array.max())}")
    return data, label_array


def _read_names(file: Path, kind: str, key: str, count: int) -> tuple[str, ...] | None:
    if not file.is_file():
        return None
    try:
        meta = load_numpy_pickle(file)
    except DataError as exc:
        raise DataError(f"{kind}: {exc}") from exc.__cause__
    names = _get(meta, key) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != count or not all(
            isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{kind}: {file}: expected b'{key}' with {count} class names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _load(path: str | Path, layout: _Layout, label_key: str, names_key: str, num_classes: int,
          name: str) -> DatasetSplits:
    folder = _find_folder(path, layout)
    tensors = []
    for files in (layout.train_files, layout.test_files):
        parts = [_read_batch(folder / f, layout.kind, label_key, num_classes) for f in files]
        data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
        tensors.append((images, torch.from_numpy(labels)))
    (train_x, train_y), (test_x, test_y) = tensors
    if train_x.shape[0] == 0:
        raise DataError(f"{layout.kind}: the training batches in {folder} hold no images")
    mean, std = channel_stats(train_x)
    names = _read_names(folder / layout.meta_file, layout.kind, names_key, num_classes)
    return DatasetSplits(name=name, train_images=train_x, train_labels=train_y, test_images=test_x,
                         test_labels=test_y, num_classes=num_classes, mean=mean, std=std,
                         class_names=names, default_augment=True, source=str(folder))


def load_cifar10(path: str | Path) -> DatasetSplits:
    """Load CIFAR-10 from ``cifar-10-batches-py/`` (or its parent): uint8 N x 3 x 32 x 32, int64 labels."""
    return _load(path, _LAYOUTS["cifar10"], "labels", "label_names", 10, "cifar10")


def load_cifar100(path: str | Path, coarse: bool = False) -> DatasetSplits:
    """Load CIFAR-100 from ``cifar-100-python/`` (or its parent): 100 fine labels, or 20 coarse ones."""
    if coarse:
        return _load(path, _LAYOUTS["cifar100"], "coarse_labels", "coarse_label_names", 20, "cifar100")
    return _load(path, _LAYOUTS["cifar100"], "fine_labels", "fine_label_names", 100, "cifar100")


def _as_rows(images: Tensor | np.ndarray, what: str) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim not in (2, 4) or array.shape[1:] not in ((3, 32, 32), (_PIXELS,)):
        raise DataError(f"write_cifar_folder: {what} must be uint8 N x 3 x 32 x 32 (or N x 3072), "
                        f"got {array.dtype} with shape {array.shape}")
    return np.ascontiguousarray(array.reshape(array.shape[0], _PIXELS))


def _as_label_list(labels: Tensor | np.ndarray | Sequence[int], count: int, what: str,
                   num_classes: int) -> list[int]:
    array = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    if array.shape != (count,):
        raise DataError(f"write_cifar_folder: {what} must hold {count} labels, got shape {array.shape}")
    if count and (array.min() < 0 or array.max() >= num_classes):
        raise DataError(f"write_cifar_folder: {what} must lie in 0..{num_classes - 1}")
    return [int(v) for v in array]


def write_cifar_folder(path: str | Path, images: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int],
                       kind: str = "cifar10", *, test_images: Tensor | np.ndarray | None = None,
                       test_labels: Tensor | np.ndarray | Sequence[int] | None = None,
                       coarse_labels: Tensor | np.ndarray | Sequence[int] | None = None,
                       test_coarse_labels: Tensor | np.ndarray | Sequence[int] | None = None,
                       label_names: Sequence[str] | None = None, protocol: int = 4) -> Path:
    """Write ``images``/``labels`` (uint8 N x 3 x 32 x 32) into ``path`` in the standard CIFAR pickle format.

    Without ``test_images`` the training images are written as the test batch too. For CIFAR-100,
    coarse labels default to ``fine // 5``. Returns ``path``; load it with ``load_dataset(f"{kind}:{path}")``.
    """
    if kind not in _LAYOUTS:
        raise DataError(f"write_cifar_folder: kind must be 'cifar10' or 'cifar100', got {kind!r}")
    layout = _LAYOUTS[kind]
    num_classes = 10 if kind == "cifar10" else 100
    train_rows = _as_rows(images, "images")
    train_labels = _as_label_list(labels, train_rows.shape[0], "labels", num_classes)
    if test_images is None:
        if test_labels is not None:
            raise DataError("write_cifar_folder: test_labels given without test_images")
        test_rows, test_label_list = train_rows, train_labels
        test_coarse_labels = coarse_labels if test_coarse_labels is None else test_coarse_labels
    else:
        if test_labels is None:
            raise DataError("write_cifar_folder: test_images given without test_labels")
        test_rows = _as_rows(test_images, "test_images")
        test_label_list = _as_label_list(test_labels, test_rows.shape[0], "test_labels", num_classes)
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict[bytes, Any]) -> None:
        with open(folder / name, "wb") as handle:
            pickle.dump(obj, handle, protocol=protocol)

    def filenames(count: int, offset: int) -> list[bytes]:
        return [f"image_{offset + i:05d}.png".encode() for i in range(count)]

    if kind == "cifar10":
        names = list(label_names) if label_names is not None else list(CIFAR10_CLASSES)
        if len(names) != 10:
            raise DataError(f"write_cifar_folder: cifar10 needs 10 label names, got {len(names)}")
        bounds = np.linspace(0, train_rows.shape[0], len(layout.train_files) + 1).round().astype(int)
        for i, file in enumerate(layout.train_files):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            dump(file, {b"batch_label": f"training batch {i + 1} of {len(layout.train_files)}".encode(),
                        b"labels": train_labels[lo:hi], b"data": train_rows[lo:hi].copy(),
                        b"filenames": filenames(hi - lo, lo)})
        dump("test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_label_list,
                            b"data": test_rows, b"filenames": filenames(test_rows.shape[0], 0)})
        dump(layout.meta_file, {b"num_cases_per_batch": int(bounds[1] - bounds[0]),
                                b"label_names": [n.encode() for n in names], b"num_vis": _PIXELS})
        return folder

    fine_names = list(label_names) if label_names is not None else [f"class_{i:02d}" for i in range(100)]
    if len(fine_names) != 100:
        raise DataError(f"write_cifar_folder: cifar100 needs 100 label names, got {len(fine_names)}")
    train_coarse = (_as_label_list(coarse_labels, len(train_labels), "coarse_labels", 20)
                    if coarse_labels is not None else [v // 5 for v in train_labels])
    test_coarse = (_as_label_list(test_coarse_labels, len(test_label_list), "test_coarse_labels", 20)
                   if test_coarse_labels is not None else [v // 5 for v in test_label_list])
    for file, rows, fine, coarse, label in (("train", train_rows, train_labels, train_coarse, b"training"),
                                            ("test", test_rows, test_label_list, test_coarse, b"testing")):
        dump(file, {b"filenames": filenames(rows.shape[0], 0), b"batch_label": label + b" batch 1 of 1",
                    b"fine_labels": fine, b"coarse_labels": coarse, b"data": rows})
    dump(layout.meta_file, {b"fine_label_names": [n.encode() for n in fine_names],
                            b"coarse_label_names": [f"superclass_{i:02d}".encode() for i in range(20)]})
    return folder
