"""Data sets through the real readers (tiny CIFAR folders and IDX files written here) and augmentation."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.engine.data.datasets import (
    ImageData,
    augment_crop_flip,
    is_cifar_like,
    load_dataset,
    load_npz,
    read_idx,
    to_unit_float,
)
from core.engine.data.npz import stratified_split, validate_npz_arrays
from core.errors import DatasetUnavailable, InvalidDataset

# --- helpers that write files in the original formats ---------------------------------------------

def _cifar_batch(path: Path, data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> None:
    """A batch exactly as CIFAR ships it: a protocol-2 pickle of a dict with bytes keys."""
    batch = {b"batch_label": b"testing batch", label_key: labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _write_cifar10(root: Path, rng: np.random.Generator, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _cifar_batch(folder / name, data, labels)
        written[name] = (data, labels)
    return written


def _idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _write_fashion(folder: Path, rng: np.random.Generator, *, compress: bool) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    arrays = [rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=6, dtype=np.uint8),
              rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=3, dtype=np.uint8)]
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for name, array in zip(names, arrays, strict=True):
        _idx(folder / (name + (".gz" if compress else "")), array, compress=compress)
    return arrays


# --- CIFAR ---------------------------------------------------------------------------------------

def test_cifar10_folder_loads_with_the_right_pixels_and_labels(tmp_path: Path) -> None:
    written = _write_cifar10(tmp_path, np.random.default_rng(0))
    data = load_dataset("cifar10", data_dir=tmp_path)
    assert data.num_classes == 10 and data.image_shape == (3, 32, 32)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    # Row layout: 1024 red values, then green, then blue, each row-major.
    first, labels = written["data_batch_1"]
    assert data.train_x[0, 0, 0, 1] == first[0, 1]
    assert data.train_x[0, 1, 0, 0] == first[0, 1024]
    assert data.train_x[0, 2, 31, 31] == first[0, 3071]
    assert data.train_y[:4].tolist() == labels
    assert data.train_x[16:].flatten(1).numpy().tolist() == written["data_batch_5"][0].tolist()
    assert data.test_y.tolist() == written["test_batch"][1]


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    for name, data, fine in (("train", train, [0, 99, 42, 7, 3]), ("test", train[:2], [5, 98])):
        batch = {b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * len(fine)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    data = load_dataset("cifar100", data_dir=tmp_path)
    assert data.num_classes == 100
    assert data.train_y.tolist() == [0, 99, 42, 7, 3] and data.test_y.tolist() == [5, 98]
    assert torch.equal(data.test_x.flatten(1), torch.from_numpy(train[:2]))


def test_cifar_pickles_written_by_numpy_1_load(tmp_path: Path) -> None:
    """The published CIFAR files name numpy.core.multiarray, which numpy 2 moved to numpy._core."""
    written = _write_cifar10(tmp_path, np.random.default_rng(4))
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    raw = batch.read_bytes()
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    batch.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    data = load_dataset("cifar10", data_dir=tmp_path)
    assert np.array_equal(data.train_x[4:8].flatten(1).numpy(), written["data_batch_2"][0])


class _Boom:
    """Unpickling this runs os.system: a reader that plainly unpickles would execute it."""

    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


def test_a_cifar_pickle_naming_a_non_numpy_global_is_refused(tmp_path: Path) -> None:
    _write_cifar10(tmp_path, np.random.default_rng(0))
    bad = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"payload": _Boom()}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(InvalidDataset, match=r"refusing to load .*system"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_a_truncated_cifar_batch_is_a_clear_error(tmp_path: Path) -> None:
    _write_cifar10(tmp_path, np.random.default_rng(0))
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(InvalidDataset, match="truncated or corrupt"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_missing_cifar_without_downloads_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("cifar10", data_dir=tmp_path, allow_download=False)
    assert str(tmp_path / "cifar-10-batches-py") in info.value.message
    assert info.value.code == "dataset_unavailable"


# --- Fashion-MNIST -------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_idx_files_load(tmp_path: Path, compress: bool) -> None:
    train_x, train_y, test_x, test_y = _write_fashion(tmp_path / "fashion-mnist", np.random.default_rng(2),
                                                      compress=compress)
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert np.array_equal(data.train_x[:, 0].numpy(), train_x) and np.array_equal(data.test_x[:, 0].numpy(), test_x)
    assert data.train_y.tolist() == train_y.tolist() and data.test_y.tolist() == test_y.tolist()


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _idx(good, np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert read_idx(good).tolist() == np.arange(12).reshape(3, 4).tolist()
    raw = good.read_bytes()
    cases = {
        "magic": b"\x01" + raw[1:],
        "type 0x0d": raw[:2] + b"\x0d" + raw[3:],
        "truncated": raw[:-1],
        "truncated IDX header": raw[:6],
    }
    for expected, content in cases.items():
        path = tmp_path / "bad"
        path.write_bytes(content)
        with pytest.raises(InvalidDataset, match=expected):
            read_idx(path)


def test_missing_fashion_mnist_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.engine.data.datasets

    # the machine may have the package
    monkeypatch.setattr(core.engine.data.datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetUnavailable, match="IDX files"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


# --- digits --------------------------------------------------------------------------------------

def test_digits_shapes_ranges_and_split(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    data = load_dataset("digits", data_dir=tmp_path)
    assert isinstance(data, ImageData) and data.name == "digits"
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    n_train, n_test = len(data.train_y), len(data.test_y)
    assert n_train + n_test == 1797 and abs(n_test / 1797 - 0.2) < 0.01
    assert data.train_x.dtype == torch.uint8 and data.train_x.is_contiguous()
    assert int(data.train_x.max()) == 255 and int(data.train_x.min()) == 0
    # Every class is split about 80/20.
    counts = torch.bincount(data.test_y, minlength=10).float() / (torch.bincount(data.train_y, minlength=10)
                                                                  + torch.bincount(data.test_y, minlength=10))
    assert torch.all((counts - 0.2).abs() < 0.02)
    # Pixels are round(v · 255 / 16) of the originals: each image is found among sklearn's.
    images = load_digits().images
    scaled = {np.round(im * 255 / 16).astype(np.uint8).tobytes() for im in images}
    assert all(x.numpy().tobytes() in scaled for x in data.test_x[:50, 0])
    # Deterministic: a second load is identical.
    again = load_dataset("digits", data_dir=tmp_path)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


# --- .npz ----------------------------------------------------------------------------------------

def test_npz_layouts_are_normalised_to_nchw(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    nchw = rng.integers(0, 256, size=(20, 3, 10, 12), dtype=np.uint8)
    y = np.arange(20) % 4
    for layout, x in (("nchw", nchw), ("nhwc", nchw.transpose(0, 2, 3, 1))):
        out_x, out_y = validate_npz_arrays(x, y)
        assert out_x.shape == (20, 3, 10, 12) and np.array_equal(out_x, nchw), layout
        assert out_y.dtype == np.int64 and out_x.flags.c_contiguous
    gray, _ = validate_npz_arrays(nchw[:, 0], y)
    assert gray.shape == (20, 1, 10, 12)

    path = tmp_path / "mine.npz"
    np.savez(path, x=nchw.transpose(0, 2, 3, 1), y=y.astype(np.uint8))
    data = load_dataset(str(path), data_dir=tmp_path)
    assert data.name == "mine" and data.num_classes == 4 and data.image_shape == (3, 10, 12)
    assert len(data.train_y) + len(data.test_y) == 20 and set(data.test_y.tolist()) == {0, 1, 2, 3}
    # Each image keeps its own label through the split.
    by_pixels = {nchw[i].tobytes(): int(y[i]) for i in range(20)}
    pairs = zip(data.train_x, data.train_y, strict=True)
    assert all(by_pixels[x.numpy().tobytes()] == int(label) for x, label in pairs)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((100, 8, 8), np.uint8), np.zeros(99, np.int64), "x has 100 images but y has 99 labels"),
    (np.zeros((4, 8, 8), np.float32), np.zeros(4, np.int64), "uint8"),
    (np.zeros((4, 64), np.uint8), np.zeros(4, np.int64), "2 dimensions"),
    (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, -1, 2]), "≥ 0"),
    (np.zeros((0, 8, 8), np.uint8), np.zeros(0, np.int64), "no images"),
    (np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.int64), "at least 8×8"),
    (np.zeros((4, 8, 8, 5), np.uint8), np.zeros(4, np.int64), "1 .grayscale. or 3 .RGB. channels"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.float32), "integer class labels"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros((4, 1), np.int64), "1-D"),
])
def test_npz_validation_errors(x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidDataset, match=message):
        validate_npz_arrays(x, y)


def test_npz_files_without_arrays_or_with_pickles_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    np.savez(missing, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InvalidDataset, match="no array named x, y"):
        load_npz(missing)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([object()] * 2, dtype=object), y=np.zeros(2, np.int64))
    with pytest.raises(InvalidDataset, match=r"not a readable \.npz"):
        load_npz(objects)


def test_stratified_split_is_deterministic_and_disjoint() -> None:
    y = np.repeat(np.arange(3), [10, 5, 2])
    train, test = stratified_split(y, test_fraction=0.2, seed=7)
    again = stratified_split(y, test_fraction=0.2, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(17))
    assert np.bincount(y[test]).tolist() == [2, 1, 1]


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="unknown data set 'mnist3d'"):
        load_dataset("mnist3d", data_dir=tmp_path)


# --- tensors and augmentation --------------------------------------------------------------------

def test_to_unit_float_scales_uint8() -> None:
    x = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)
    out = to_unit_float(x, "cpu")
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    assert to_unit_float(x, "cpu", dtype=torch.float64).dtype == torch.float64
    with pytest.raises(TypeError):
        to_unit_float(out, "cpu")


def _ramp_batch(b: int = 64) -> torch.Tensor:
    """Images whose every pixel is distinct and positive, so a crop's offset can be read back."""
    base = torch.arange(1, 3 * 16 * 16 + 1, dtype=torch.float32).view(3, 16, 16)
    return base.expand(b, 3, 16, 16).contiguous()


def test_augmentation_keeps_shape_and_is_deterministic_per_seed() -> None:
    x = torch.rand(8, 3, 32, 32)
    a = augment_crop_flip(x, generator=torch.Generator().manual_seed(5))
    b = augment_crop_flip(x, generator=torch.Generator().manual_seed(5))
    c = augment_crop_flip(x, generator=torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
    assert torch.equal(a, b) and not torch.equal(a, c)
    cl = augment_crop_flip(x.contiguous(memory_format=torch.channels_last), generator=torch.Generator().manual_seed(5))
    assert torch.equal(cl, a) and cl.is_contiguous(memory_format=torch.channels_last)


def test_each_output_is_a_shifted_possibly_flipped_window_of_its_zero_padded_input() -> None:
    pad = 4
    x = _ramp_batch()
    out = augment_crop_flip(x, pad=pad, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    shifts, flips = set(), 0
    for i in range(len(x)):
        matches = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy:dy + 16, dx:dx + 16]))]
        assert len(matches) == 1, f"image {i} is not one crop of its padded input"
        dy, dx, flip = matches[0]
        shifts.add((dy, dx))
        flips += flip
    # Crops really move and flips really happen, in varied amounts.
    assert len(shifts) > 10 and 10 < flips < 54
    # Zero padding enters the picture when the window leaves the image.
    assert (out == 0).any()


def test_no_padding_means_only_flips() -> None:
    x = _ramp_batch(32)
    out = augment_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert torch.all(flipped ^ same) and flipped.any() and same.any()


def test_is_cifar_like() -> None:
    assert is_cifar_like((3, 32, 32)) and is_cifar_like(torch.Size([3, 32, 32]))
    assert not is_cifar_like((1, 28, 28)) and not is_cifar_like((3, 64, 64))


def test_npz_checks_do_not_import_torch() -> None:
    """The API validates uploads with core.engine.data.npz and must stay torch-free."""
    import subprocess

    code = "import sys, core.engine.data.npz; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
