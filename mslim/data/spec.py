"""``load_dataset("KIND[:PATH]")``: one entry point for every dataset kind, and the registry of kinds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mslim_core.errors import DataError

from .cifar import load_cifar10, load_cifar100
from .digits import load_digits
from .image_folder import load_image_folder
from .splits import DatasetSplits
from .tensor_file import load_tensor_files

__all__ = ["load_dataset", "register_dataset_kind", "dataset_kinds", "DatasetKind"]


@dataclass(frozen=True)
class DatasetKind:
    """One dataset kind: its loader ``(path or None, **options) -> DatasetSplits`` and what PATH means."""

    name: str
    load: Callable[..., DatasetSplits]
    path_help: str | None  # None: the kind takes no path
    description: str = ""


_KINDS: dict[str, DatasetKind] = {}


def register_dataset_kind(kind: DatasetKind, *, replace: bool = False) -> None:
    """Make ``kind.name`` usable in ``load_dataset`` specs."""
    name = kind.name.lower()
    if not name.isidentifier():
        raise DataError(f"dataset kind names must be identifiers, got {kind.name!r}")
    if name in _KINDS and not replace:
        raise DataError(f"dataset kind {name!r} is already registered")
    _KINDS[name] = kind


def dataset_kinds() -> dict[str, DatasetKind]:
    """The registered dataset kinds by name."""
    return dict(sorted(_KINDS.items()))


def _options(options: dict[str, Any], allowed: tuple[str, ...], kind: str) -> dict[str, Any]:
    unknown = sorted(k for k, v in options.items() if k not in allowed and v is not None)
    if unknown:
        raise DataError(f"{kind}: unknown option(s) {', '.join(unknown)}; {kind} accepts "
                        f"{', '.join(allowed) if allowed else 'no options'}")
    return {k: v for k, v in options.items() if k in allowed and v is not None}


def _digits(path: str | None, **options: Any) -> DatasetSplits:
    return load_digits(**_options(options, ("seed", "test_fraction", "size", "resize_mode"), "digits"))


def _cifar10(path: str, **options: Any) -> DatasetSplits:
    _options(options, ("seed",), "cifar10")
    return load_cifar10(path)


def _cifar100(path: str, **options: Any) -> DatasetSplits:
    opts = _options(options, ("seed", "coarse"), "cifar100")
    return load_cifar100(path, coarse=bool(opts.get("coarse", False)))


def _tensors(path: str, **options: Any) -> DatasetSplits:
    opts = _options(options, ("seed", "test_fraction"), "tensors")
    parts = [p.strip() for p in path.split(",")]
    if len(parts) > 2 or not all(parts):
        raise DataError(f"tensors: expected 'tensors:TRAIN.pt' or 'tensors:TRAIN.pt,TEST.pt', got {path!r}")
    return load_tensor_files(parts[0], parts[1] if len(parts) == 2 else None, **opts)


def _folder(path: str, **options: Any) -> DatasetSplits:
    return load_image_folder(path, **_options(options, ("seed", "test_fraction", "size"), "folder"))


for _kind in (
    DatasetKind("digits", _digits, None, "scikit-learn's 8x8 digits, stratified split by seed"),
    DatasetKind("cifar10", _cifar10, "the cifar-10-batches-py folder or its parent", "CIFAR-10 python batches"),
    DatasetKind("cifar100", _cifar100, "the cifar-100-python folder or its parent", "CIFAR-100 python batches"),
    DatasetKind("tensors", _tensors, "TRAIN.pt or TRAIN.pt,TEST.pt", ".pt files of images and labels"),
    DatasetKind("folder", _folder, "a folder with train/<class>/ and val/<class>/ (or test/)",
                "image files, one folder per class"),
):
    register_dataset_kind(_kind)


def load_dataset(spec: str, *, seed: int = 0, test_fraction: float | None = None, size: int | None = None,
                 resize_mode: str | None = None, coarse: bool | None = None) -> DatasetSplits:
    """Load the dataset named by ``spec`` = ``KIND[:PATH]`` (e.g. ``digits``, ``cifar10:~/data``).

    Options a kind does not use must be left unset; ``seed`` only affects kinds that split.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset spec must be 'KIND[:PATH]' with KIND one of "
                        f"{', '.join(dataset_kinds())}; got {spec!r}")
    name, sep, path = spec.strip().partition(":")
    kind = _KINDS.get(name.strip().lower())
    if kind is None:
        raise DataError(f"unknown dataset kind {name.strip()!r} in {spec!r}; known kinds: "
                        f"{', '.join(dataset_kinds())}")
    path = path.strip()
    options = {"seed": seed, "test_fraction": test_fraction, "size": size, "resize_mode": resize_mode,
               "coarse": coarse}
    if kind.path_help is None:
        if path:
            raise DataError(f"{kind.name}: takes no path, got {spec!r}; write just {kind.name!r}")
        return kind.load(None, **options)
    if not path:
        raise DataError(f"{kind.name}: needs a path, '{kind.name}:PATH' with PATH {kind.path_help}")
    if kind.name != "tensors":
        path = str(Path(path).expanduser())
    return kind.load(path, **options)
