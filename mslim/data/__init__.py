"""Datasets and fast in-memory loaders for training and evaluating pruned models.

``load_dataset("KIND[:PATH]")`` returns :class:`DatasetSplits`; ``make_loaders`` turns it into
train/val :class:`TensorLoader` objects. Nothing is downloaded: CIFAR folders, ``.pt`` files and
image folders are read from disk, digits ship with scikit-learn.
"""

from __future__ import annotations

from .augment import BatchAugment, crop_and_flip, normalize, random_crop, random_hflip
from .cifar import CIFAR10_CLASSES, load_cifar10, load_cifar100, write_cifar_folder
from .digits import load_digits
from .image_folder import load_image_folder
from .loader import TensorLoader, make_loaders
from .safe_pickle import RestrictedUnpickler, load_numpy_pickle
from .spec import DatasetKind, dataset_kinds, load_dataset, register_dataset_kind
from .splits import DatasetSplits, channel_stats, stratified_split
from .tensor_file import load_tensor_file, load_tensor_files, save_tensor_file

__all__ = [
    "BatchAugment", "CIFAR10_CLASSES", "DatasetKind", "DatasetSplits", "RestrictedUnpickler", "TensorLoader",
    "channel_stats", "crop_and_flip", "dataset_kinds", "load_cifar10", "load_cifar100", "load_dataset",
    "load_digits", "load_image_folder", "load_numpy_pickle", "load_tensor_file", "load_tensor_files",
    "make_loaders", "normalize", "random_crop", "random_hflip", "register_dataset_kind", "save_tensor_file",
    "stratified_split", "write_cifar_folder",
]
