"""An in-memory batch loader over image/label tensors, reproducible per epoch and shardable across ranks."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from mslim_core.errors import DataError

from .augment import crop_and_flip, normalize
from .splits import DatasetSplits, check_images_labels, to_float_images

__all__ = ["TensorLoader", "make_loaders"]

AugmentArg = Callable[[Tensor, torch.Generator], Tensor] | bool | None
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant to spread (seed, epoch, stream) into one seed


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    value = (int(seed) * _MIX + int(epoch) * 0x632BE59BD9B4E019 + int(stream) * 0x85EBCA77C2B2AE63)
    return value % (2**63 - 1)


class TensorLoader:
    """Iterates ``(float images, int64 labels)`` batches from tensors held in memory.

    The order of epoch ``e`` depends only on ``(seed, e)``, so ``set_epoch(e)`` on a resumed run
    reproduces it; with ``world_size > 1`` each rank takes a disjoint slice of that order.
    uint8 images are converted to float in [0, 1] per batch, then augmented, then normalised.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = True,
                 augment: AugmentArg = None, seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, equal_shards: bool = True,
                 device: torch.device | str | None = None) -> None:
        images, labels = check_images_labels(images, labels, "TensorLoader")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise DataError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        if (mean is None) != (std is None):
            raise DataError("give both mean and std for normalisation, or neither")
        if augment is True:
            augment = crop_and_flip()
        elif augment is False:
            augment = None
        if augment is not None and not callable(augment):
            raise DataError(f"augment must be a callable (images, generator) -> images, True, False "
                            f"or None, got {type(augment).__name__}")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.equal_shards = equal_shards
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0
        if equal_shards and self.num_samples == 0 and len(labels) > 0:
            raise DataError(f"{len(labels)} samples cannot give every one of {world_size} ranks a sample")

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (the dataset size when not sharded)."""
        n = len(self.labels)
        if self.world_size == 1:
            return n
        if self.equal_shards:
            return n // self.world_size
        return n // self.world_size + (1 if self.rank < n % self.world_size else 0)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses (for resuming)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise DataError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """The position to resume from: the epoch the next iteration will use, and the seed."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))

    def indices(self, epoch: int | None = None) -> Tensor:
        """The sample indices this rank visits in ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.labels)
        if self.shuffle:
            generator = torch.Generator().manual_seed(_stream_seed(self.seed, epoch, 0))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size == 1:
            return order
        if self.equal_shards:
            per_rank = n // self.world_size
            return order[self.rank * per_rank:(self.rank + 1) * per_rank]
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return order[start:start + self.num_samples]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield this epoch's batches; a completed pass moves on to the next epoch."""
        epoch = self.epoch
        order = self.indices(epoch)
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, epoch, 1 + self.rank))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]
            y = self.labels[idx]
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            x = to_float_images(x)
            if self.augment is not None:
                x = self.augment(x, generator)
            if self.mean is not None and self.std is not None:
                x = normalize(x, self.mean, self.std)
            yield x, y
        if self.epoch == epoch:
            self.epoch = epoch + 1

    def __repr__(self) -> str:
        return (f"TensorLoader(samples={self.num_samples}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, augment={self.augment!r}, rank={self.rank}/{self.world_size})")


def make_loaders(splits: DatasetSplits, batch_size: int, *, eval_batch_size: int | None = None,
                 augment: AugmentArg = None, seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, normalise: bool = True,
                 device: torch.device | str | None = None) -> tuple[TensorLoader, TensorLoader]:
    """Return ``(train_loader, val_loader)``: shuffled and augmented train, ordered un-augmented test.

    ``augment=None`` uses the dataset's default (crop + flip for CIFAR, none otherwise). The val loader
    shards unevenly so that across ranks every test sample is seen exactly once.
    """
    if augment is None:
        augment = crop_and_flip() if splits.default_augment else None
    mean = splits.mean if normalise else None
    std = splits.std if normalise else None
    train = TensorLoader(splits.train_images, splits.train_labels, batch_size, shuffle=True, augment=augment,
                         seed=seed, drop_last=drop_last, rank=rank, world_size=world_size, mean=mean, std=std,
                         device=device)
    val = TensorLoader(splits.test_images, splits.test_labels, eval_batch_size or batch_size, shuffle=False,
                       augment=None, seed=seed, drop_last=False, rank=rank, world_size=world_size, mean=mean,
                       std=std, equal_shards=False, device=device)
    return train, val

