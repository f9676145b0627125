"""Tests of mslim.data: CIFAR folders, safe unpickling, digits, tensor/image files, augmentation, loaders."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mslim.data import (
    BatchAugment,
    DatasetSplits,
    TensorLoader,
    channel_stats,
    crop_and_flip,
    load_dataset,
    load_digits,
    make_loaders,
    normalize,
    random_crop,
    random_hflip,
    save_tensor_file,
    stratified_split,
    write_cifar_folder,
)
from mslim.data.safe_pickle import loads_numpy_pickle
from mslim_core.errors import DataError


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes and str as Python 2 str opcodes, as the original CIFAR files were written."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_str8(self, obj: bytes | str) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("ascii")
        if len(data) < 256:
            self.write(b"U" + bytes([len(data)]) + data)
        else:
            self.write(b"T" + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_str8
    dispatch[str] = _save_str8


def _py2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (self.command,))


# ---------------------------------------------------------------- CIFAR


def test_cifar10_round_trip_folder_and_parent(tmp_path: Path) -> None:
    train, test = _images(13, 1), _images(4, 2)
    train_y, test_y = torch.arange(13) % 10, torch.tensor([9, 0, 3, 3])
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", train, train_y, test_images=test,
                                test_labels=test_y)
    for spec in (f"cifar10:{folder}", f"cifar10:{tmp_path}"):
        splits = load_dataset(spec)
        assert splits.train_images.dtype == torch.uint8 and splits.train_images.shape == (13, 3, 32, 32)
        assert splits.test_images.shape == (4, 3, 32, 32)
        assert splits.train_labels.dtype == torch.int64
        assert torch.equal(splits.train_images, train) and torch.equal(splits.test_images, test)
        assert torch.equal(splits.train_labels, train_y) and torch.equal(splits.test_labels, test_y)
        assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, (32, 32))
        assert splits.class_names is not None and splits.class_names[0] == "airplane"
        assert splits.default_augment
    direct = train.double() / 255
    assert splits.mean == pytest.approx(direct.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert splits.std == pytest.approx(direct.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).tolist(),
                                       abs=1e-7)
    # the files follow the real format: bytes keys, N x 3072 uint8 rows, list labels
    with open(folder / "data_batch_1", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape[1] == 3072
    assert isinstance(batch[b"labels"], list)
    assert np.array_equal(batch[b"data"][0].reshape(3, 32, 32), train[0].numpy())


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    train = _images(6, 3)
    fine = torch.tensor([0, 17, 99, 45, 45, 3])
    coarse = torch.tensor([19, 0, 5, 5, 7, 1])
    write_cifar_folder(tmp_path / "cifar-100-python", train, fine, kind="cifar100", coarse_labels=coarse)
    splits = load_dataset(f"cifar100:{tmp_path}")
    assert splits.num_classes == 100 and torch.equal(splits.train_labels, fine)
    assert torch.equal(splits.train_images, train) and torch.equal(splits.test_images, train)
    assert splits.class_names is not None and len(splits.class_names) == 100
    coarse_splits = load_dataset(f"cifar100:{tmp_path / 'cifar-100-python'}", coarse=True)
    assert coarse_splits.num_classes == 20 and torch.equal(coarse_splits.train_labels, coarse)
    with open(tmp_path / "cifar-100-python" / "train", "rb") as handle:
        assert set(pickle.load(handle, encoding="bytes")) == {
            b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_load(tmp_path: Path, protocol: int) -> None:
    train = _images(5, protocol)
    write_cifar_folder(tmp_path, train, [1, 2, 3, 4, 5], protocol=protocol)
    assert torch.equal(load_dataset(f"cifar10:{tmp_path}").train_images, train)


def test_python2_style_batch_loads(tmp_path: Path) -> None:
    train = _images(5, 7)
    folder = write_cifar_folder(tmp_path, train, [0, 1, 2, 3, 4])
    rows = train.numpy().reshape(5, 3072)
    (folder / "data_batch_1").write_bytes(_py2_pickle(
        {b"batch_label": b"training batch 1 of 5", b"labels": [0], b"data": rows[:1].copy(),
         b"filenames": [b"a.png"]}))
    splits = load_dataset(f"cifar10:{folder}")
    assert torch.equal(splits.train_images, train) and splits.train_labels.tolist() == [0, 1, 2, 3, 4]


def test_missing_folder_and_missing_batch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar10: no such folder: .*nowhere"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", _images(5), [0] * 5)
    (folder / "data_batch_3").unlink()
    pattern = (r"cifar10: expected data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, "
               r"test_batch in .*cifar-10-batches-py .*missing: data_batch_3; found: batches.meta, data_batch_1")
    with pytest.raises(DataError, match=pattern):
        load_dataset(f"cifar10:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"cifar100: expected train, test in .*empty .*found: \(nothing\)"):
        load_dataset(f"cifar100:{empty}")


def test_wrong_array_size_and_bad_labels(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path, _images(5), [0] * 5)
    bad = {b"batch_label": b"x", b"labels": [0] * 4, b"data": np.zeros((4, 3000), np.uint8), b"filenames": []}
    (folder / "data_batch_2").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"data_batch_2: b'data' must be an N x 3072 uint8 array, got shape \(4, 3000\)"):
        load_dataset(f"cifar10:{folder}")
    bad.update({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]})
    (folder / "data_batch_2").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"b'labels' must lie in 0..9, found 0..10"):
        load_dataset(f"cifar10:{folder}")
    bad[b"labels"] = [0, 1]
    (folder / "data_batch_2").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"4 images but b'labels' has shape \(2,\)"):
        load_dataset(f"cifar10:{folder}")
    (folder / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match=r"cifar10: .*data_batch_2: not a readable pickle"):
        load_dataset(f"cifar10:{folder}")


def test_forbidden_global_is_refused_without_running(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path / "c", _images(5), [0] * 5)
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _RunsShell(f"touch {marker}")}
    for protocol in (2, 4):
        (folder / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=protocol))
        with pytest.raises(DataError, match=r"cifar10: .*data_batch_1: refused to unpickle global (os|posix)\.system"):
            load_dataset(f"cifar10:{folder}")
        assert not marker.exists()
    # other classic gadgets are refused too
    for module, name in (("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load"), ("_codecs", "decode")):
        payload = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00."
        with pytest.raises(DataError, match=rf"refused to unpickle global {module}\.{name}"):
            loads_numpy_pickle(payload)
    # _codecs.encode is allowed only as protocol-2 pickles use it
    with pytest.raises(DataError, match=r"refused _codecs.encode"):
        loads_numpy_pickle(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")


# ---------------------------------------------------------------- digits


def test_digits_split_is_deterministic_and_stratified() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.test_images, c.test_images)
    assert a.train_images.shape[1:] == (1, 8, 8) and a.train_images.dtype == torch.float32
    assert float(a.train_images.min()) == 0.0 and float(a.train_images.max()) == 1.0
    assert len(a.train_labels) + len(a.test_labels) == 1797
    total = torch.bincount(torch.cat([a.train_labels, a.test_labels]), minlength=10)
    expected_test = torch.round(total.double() * 0.2).long()
    assert torch.equal(torch.bincount(a.test_labels, minlength=10), expected_test)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, (8, 8))


def test_stratified_split_partitions() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train, test = stratified_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(16))
    assert torch.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    with pytest.raises(DataError, match="test_fraction must be between 0 and 1"):
        stratified_split(labels, 1.0, 0)


def test_digits_upscaling() -> None:
    small = load_digits(seed=0)
    big = load_dataset("digits", size=16)
    assert big.train_images.shape[1:] == (1, 16, 16)
    direct = small.train_images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(big.train_images, direct)
    smooth = load_digits(size=32, resize_mode="bilinear")
    assert smooth.image_size == (32, 32)
    assert smooth.train_images.mean().item() == pytest.approx(small.train_images.mean().item(), abs=1e-3)
    with pytest.raises(DataError, match="size must be a multiple of 8"):
        load_digits(size=12)


# ---------------------------------------------------------------- augmentation


def test_random_crop_is_a_shift_of_the_padded_image() -> None:
    x = torch.rand(6, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    padded = torch.zeros(6, 3, 9, 11)
    padded[:, :, 2:7, 2:9] = x
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 7])
    assert out.shape == x.shape
    # fixed offsets: (2, 2) is the identity, (0, 0) shifts down-right with zeros entering
    same = random_crop(x, 2, g, offsets=(torch.full((6,), 2), torch.full((6,), 2)))
    assert torch.equal(same, x)
    shifted = random_crop(x, 2, g, offsets=(torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)))
    assert torch.equal(shifted[:, :, 2:, 2:], x[:, :, :3, :5]) and shifted[:, :, :2].abs().sum() == 0


def test_flip_normalize_and_determinism() -> None:
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    flips = torch.tensor([True, False] * 4)
    out = random_hflip(x, torch.Generator(), flips=flips)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    assert torch.equal(out[0, :, :, 0], x[0, :, :, 3])
    drawn = random_hflip(x, torch.Generator().manual_seed(5))
    expected = torch.rand(8, generator=torch.Generator().manual_seed(5)) < 0.5
    assert torch.equal(drawn, torch.where(expected.view(-1, 1, 1, 1), x.flip(3), x))
    aug = crop_and_flip(4)
    a = aug(x, torch.Generator().manual_seed(9))
    b = aug(x, torch.Generator().manual_seed(9))
    c = aug(x, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert BatchAugment(crop_padding=0, flip_p=0.0)(x, torch.Generator()) is x
    normed = normalize(x, (0.5, 0.25, 0.0), (0.5, 2.0, 1.0))
    assert torch.allclose(normed[:, 1], (x[:, 1] - 0.25) / 2.0)
    with pytest.raises(DataError, match="2 means and 2 stds for 3 channels"):
        normalize(x, (0.0, 0.0), (1.0, 1.0))


# ---------------------------------------------------------------- loader


def _indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose pixel values encode their index, labels = index % 7."""
    images = (torch.arange(n, dtype=torch.uint8) % 251).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return images, torch.arange(n) % 7


def test_loader_order_reproduces_after_set_epoch() -> None:
    images, labels = _indexed(50)
    loader = TensorLoader(images, labels, batch_size=8, shuffle=True, augment=None, seed=4, drop_last=False)
    assert len(loader) == 7 and loader.num_samples == 50
    epoch0 = [y for _, y in loader]
    epoch1 = [y for _, y in loader]  # a completed pass advances the epoch
    assert loader.epoch == 2 and not torch.equal(torch.cat(epoch0), torch.cat(epoch1))
    assert sorted(torch.cat(epoch0).tolist()) == sorted(labels.tolist())
    flip_only = BatchAugment(crop_padding=0, flip_p=0.5)  # augmentation must not change the order
    resumed = TensorLoader(images, labels, batch_size=8, shuffle=True, augment=flip_only, seed=4, drop_last=False)
    resumed.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in resumed]), torch.cat(epoch1))
    for x, y in resumed:  # images stay paired with their labels, converted to float in [0, 1]
        assert x.dtype == torch.float32
        assert torch.equal(torch.round(x[:, 0, 0, 0] * 255).long() % 7, y)
    other_seed = TensorLoader(images, labels, 8, True, None, seed=5, drop_last=False)
    assert not torch.equal(torch.cat([y for _, y in other_seed]), torch.cat(epoch0))
    dropped = TensorLoader(images, labels, 8, False, None, 0, drop_last=True)
    assert len(dropped) == 6 and all(len(y) == 8 for _, y in dropped)
    state = resumed.state_dict()
    fresh = TensorLoader(images, labels, 8, True, None, 0, False)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state == {"epoch": 3, "seed": 4}


def test_loader_augmentation_is_reproducible() -> None:
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(20, dtype=torch.long)
    first = TensorLoader(images, labels, 5, True, crop_and_flip(2), seed=1, drop_last=False)
    second = TensorLoader(images, labels, 5, True, crop_and_flip(2), seed=1, drop_last=False)
    a = torch.cat([x for x, _ in first])
    second.set_epoch(0)
    assert torch.equal(a, torch.cat([x for x, _ in second]))
    assert not torch.equal(a, torch.cat([x for x, _ in second]))  # epoch 1 draws anew


def test_loader_shards_are_disjoint_and_cover() -> None:
    images, labels = _indexed(48)
    seen = []
    for rank in range(4):
        loader = TensorLoader(images, labels, 5, True, None, seed=2, drop_last=False, rank=rank, world_size=4)
        loader.set_epoch(3)
        assert loader.num_samples == 12 and len(loader) == 3
        seen.append(torch.cat([torch.round(x[:, 0, 0, 0] * 255).long() for x, _ in loader]))
    assert sorted(torch.cat(seen).tolist()) == list(range(48))
    # not divisible: equal-size disjoint slices, the remainder is left out
    images, labels = _indexed(50)
    parts = [TensorLoader(images, labels, 4, True, None, 0, False, rank=r, world_size=3).indices(0) for r in range(3)]
    assert [len(p) for p in parts] == [16, 16, 16]
    assert len(set(torch.cat(parts).tolist())) == 48
    # evaluation shards (equal_shards=False) cover every sample exactly once
    parts = [TensorLoader(images, labels, 4, False, None, 0, False, rank=r, world_size=3, equal_shards=False).indices()
             for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(50))
    with pytest.raises(DataError, match=r"rank must be in 0..2, got 3"):
        TensorLoader(images, labels, 4, rank=3, world_size=3)


def test_make_loaders_normalises_with_dataset_stats(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path, _images(10, 4), list(range(10)), test_images=_images(3, 5), test_labels=[1, 2, 3])
    splits = load_dataset(f"cifar10:{tmp_path}")
    train, val = make_loaders(splits, batch_size=4, eval_batch_size=2)
    assert isinstance(train.augment, BatchAugment) and val.augment is None and not val.shuffle
    assert (len(train), len(val)) == (3, 2)
    x, y = next(iter(val))
    expected = (splits.test_images[:2].float() / 255 - torch.tensor(splits.mean).view(1, 3, 1, 1)) / torch.tensor(
        splits.std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6) and y.tolist() == [1, 2]
    all_train = torch.cat([x for x, _ in make_loaders(splits, 10, augment=False)[0]])
    assert all_train.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(all_train.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_channel_stats_zero_spread() -> None:
    mean, std = channel_stats(torch.full((3, 2, 4, 4), 51, dtype=torch.uint8))
    assert mean == pytest.approx((0.2, 0.2)) and std == (1.0, 1.0)


# ---------------------------------------------------------------- tensor files and image folders


def test_tensor_files(tmp_path: Path) -> None:
    images = torch.rand(30, 2, 6, 6)
    labels = torch.arange(30) % 3
    save_tensor_file(tmp_path / "train.pt", images, labels, class_names=["a", "b", "c"])
    save_tensor_file(tmp_path / "test.pt", images[:4], labels[:4].int())
    both = load_dataset(f"tensors:{tmp_path / 'train.pt'},{tmp_path / 'test.pt'}")
    assert torch.equal(both.train_images, images) and torch.equal(both.test_images, images[:4])
    assert both.test_labels.dtype == torch.int64 and both.class_names == ("a", "b", "c")
    assert (both.num_classes, both.in_channels, both.image_size) == (3, 2, (6, 6))
    one = load_dataset(f"tensors:{tmp_path / 'train.pt'}", seed=1, test_fraction=0.2)
    assert (len(one.train_labels), len(one.test_labels)) == (24, 6)
    assert torch.bincount(one.test_labels).tolist() == [2, 2, 2]
    torch.save({"images": images}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=r"must hold a dict with 'images' and 'labels'; found: 'images'"):
        load_dataset(f"tensors:{tmp_path / 'bad.pt'}")
    torch.save({"images": images[0], "labels": labels}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=r"images must be N x C x H x W, got shape \(2, 6, 6\)"):
        load_dataset(f"tensors:{tmp_path / 'bad.pt'}")
    marker = tmp_path / "pwned"
    torch.save({"images": images, "labels": labels, "x": _RunsShell(f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match=r"cannot read .*evil.pt as a tensor file"):
        load_dataset(f"tensors:{tmp_path / 'evil.pt'}")
    assert not marker.exists()
    with pytest.raises(DataError, match=r"tensors: no such file: .*missing.pt"):
        load_dataset(f"tensors:{tmp_path / 'missing.pt'}")


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 3), ("val", 1)):
        for cls in ("cat", "dog"):
            for i in range(count):
                arrays[(split, cls, i)] = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
                _write_png(tmp_path / split / cls / f"{i}.png", arrays[(split, cls, i)])
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    splits = load_dataset(f"folder:{tmp_path}")
    assert splits.class_names == ("cat", "dog") and splits.num_classes == 2
    assert splits.train_images.shape == (6, 3, 5, 6) and splits.train_images.dtype == torch.uint8
    assert splits.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and splits.test_labels.tolist() == [0, 1]
    assert np.array_equal(splits.train_images[4].permute(1, 2, 0).numpy(), arrays[("train", "dog", 1)])
    grey = tmp_path / "grey"
    for cls in range(3):
        for i in range(5):
            _write_png(grey / f"c{cls}" / f"{i}.png", np.full((4, 4), cls * 50 + i, dtype=np.uint8))
    flat = load_dataset(f"folder:{grey}", size=8)
    assert flat.input_shape == (1, 8, 8) and (len(flat.train_labels), len(flat.test_labels)) == (12, 3)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(DataError, match=r"folder: no images .* in class subfolders of .*empty.train"):
        load_dataset(f"folder:{empty}")
    (tmp_path / "blank").mkdir()
    with pytest.raises(DataError, match=r"is empty or holds no class folders"):
        load_dataset(f"folder:{tmp_path / 'blank'}")


def test_image_folder_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match=r"needs Pillow, which is not installed"):
        load_dataset(f"folder:{tmp_path}")


# ---------------------------------------------------------------- specs


def test_spec_errors() -> None:
    with pytest.raises(DataError, match=r"unknown dataset kind 'imagenet' .* known kinds: cifar10, cifar100, "
                                        r"digits, folder, tensors"):
        load_dataset("imagenet:/data")
    with pytest.raises(DataError, match=r"cifar10: needs a path, 'cifar10:PATH'"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match=r"digits: takes no path"):
        load_dataset("digits:/x")
    with pytest.raises(DataError, match=r"cifar10: unknown option\(s\) size; cifar10 accepts seed"):
        load_dataset("cifar10:/x", size=16)


def test_splits_helpers() -> None:
    splits = load_dataset("DIGITS", seed=2)
    assert isinstance(splits, DatasetSplits) and splits.name == "digits"
    assert splits.example_input(3).shape == (3, 1, 8, 8)
    assert "train=1438" in repr(splits)
