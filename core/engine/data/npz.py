"""Checks and splits for image data sets held as numpy arrays (no torch).

The API validates uploaded `.npz` files with these functions before it stores them, and the
worker's `core.engine.data.datasets.load_npz` uses the same ones, so an upload that the API accepted loads.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DatasetTooLarge, InvalidDataset
from core.limits import MAX_NUM_CLASSES

MIN_IMAGE_SIZE = 8          # the 8x8 digits are the smallest images the zoo's models take
ALLOWED_CHANNELS = (1, 3)   # grayscale or RGB
_MAX_NPY_HEADER = 10_000    # bytes; numpy's own default limit for a trusted .npy header


def validate_npz_arrays(x: np.ndarray, y: np.ndarray, *,
                        max_classes: int = MAX_NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Check images `x` and labels `y`; return x as N×C×H×W uint8 and y as int64 (both contiguous).

    x may be N×H×W (grayscale), N×H×W×C or N×C×H×W with C in (1, 3); labels lie in
    0..max_classes-1 and name at least two classes. Raises InvalidDataset with a message saying
    what is wrong and how to fix it.
    """
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise InvalidDataset("x and y must be numpy arrays; save them with numpy.savez(path, x=images, y=labels).")
    channels_last = _check_image_shape(x.shape, x.dtype)
    x = x.transpose(0, 3, 1, 2) if channels_last else (x[:, None, :, :] if x.ndim == 3 else x)
    return np.ascontiguousarray(x), _check_labels(y, len(x), max_classes)


def _check_image_shape(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Check the images' dtype and shape; True when the channels come last (N×H×W×C)."""
    if dtype != np.uint8:
        hint = " (scale [0, 1] floats with (x * 255).round().astype(numpy.uint8))" if dtype.kind == "f" else ""
        raise InvalidDataset(f"x must hold uint8 pixel values 0..255, got dtype {dtype}{hint}.")
    if len(shape) not in (3, 4):
        raise InvalidDataset(f"x must be N×H×W, N×H×W×C or N×C×H×W, got {len(shape)} dimensions (shape {list(shape)}).")
    if shape[0] == 0:
        raise InvalidDataset("x holds no images; the data set must contain at least one image.")
    channels_last = len(shape) == 4 and shape[3] in ALLOWED_CHANNELS
    # When both could be channels the image is at most 3 pixels wide; the size check rejects it.
    if len(shape) == 4 and not channels_last and shape[1] not in ALLOWED_CHANNELS:
        raise InvalidDataset(f"x has shape {list(shape)}: images need 1 (grayscale) or 3 (RGB) channels, "
                             "as the second or the last dimension.")
    height, width = (shape[1], shape[2]) if len(shape) == 3 or channels_last else (shape[2], shape[3])
    if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
        raise InvalidDataset(f"images are {height}×{width}; "
                             f"they must be at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} pixels.")
    return channels_last


def _nchw(shape: tuple[int, ...]) -> list[int]:
    """[C, H, W] of one image, for images of `shape` (already checked)."""
    if len(shape) == 3:
        return [1, shape[1], shape[2]]
    return [shape[3], shape[1], shape[2]] if shape[3] in ALLOWED_CHANNELS else list(shape[1:])


def _check_label_shape(shape: tuple[int, ...], dtype: np.dtype, num_images: int) -> None:
    if len(shape) != 1:
        raise InvalidDataset(f"y must be a 1-D array of class labels, got shape {list(shape)}.")
    if dtype.kind not in "iu":
        raise InvalidDataset(f"y must hold integer class labels 0..K-1, got dtype {dtype}.")
    if shape[0] != num_images:
        raise InvalidDataset(f"x has {num_images} images but y has {shape[0]} labels; they must match one to one.")


def _check_labels(y: np.ndarray, num_images: int, max_classes: int) -> np.ndarray:
    _check_label_shape(y.shape, y.dtype, num_images)
    # Compare in y's own dtype: casting uint64 labels to int64 first would wrap them around.
    if y.min() < 0:
        raise InvalidDataset(f"labels must be ≥ 0 (classes 0..K-1), found {int(y.min())}.")
    if y.max() >= max_classes:
        raise InvalidDataset(f"labels must be below {max_classes} (classes 0..K-1 with K ≤ {max_classes}), "
                             f"found {int(y.max())}.")
    if y.max() < 1:
        raise InvalidDataset("every label is 0: a classification data set needs at least two classes.")
    return np.ascontiguousarray(y, dtype=np.int64)


@dataclass(frozen=True)
class NpyHeader:
    """What an .npy member of an .npz declares, read without loading its data."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int        # bytes of the .npy header before the data
    member_size: int   # uncompressed size the zip directory records for the member

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, name: str) -> NpyHeader:
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=_MAX_NPY_HEADER)
        else:
            raise ValueError(f"array {name!r} uses .npy format version {version[0]}.{version[1]}")
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"array {name!r} holds Python objects, which are never unpickled")
    header = NpyHeader(tuple(int(d) for d in shape), dtype, offset, info.file_size)
    if header.offset + header.nbytes > header.member_size:
        raise ValueError(f"array {name!r} declares shape {list(header.shape)} of {header.dtype} "
                         f"({header.nbytes} bytes) but its file holds {header.member_size} bytes")
    return header


def _members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Array name -> zip member, named as numpy.load names them (`x.npy` is array `x`)."""
    return {info.filename.removesuffix(".npy"): info for info in zf.infolist()}


def read_npz_headers(path: str | Path, *, label: str | None = None,
                     max_bytes: int | None = None) -> tuple[NpyHeader, NpyHeader]:
    """The headers of `x` and `y`, checked (dtype, shape, sizes) before any array is allocated:
    a header that declares more data than the file holds, or than `max_bytes` in all, is refused."""
    label = label or str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = _members(zf)
            missing = sorted({"x", "y"} - set(members))
            if missing:
                raise InvalidDataset(f"{label} has no array named {', '.join(missing)}; "
                                     "save it with numpy.savez(path, x=images, y=labels).")
            x, y = (_read_header(zf, members[name], label, name) for name in ("x", "y"))
    except InvalidDataset:
        raise
    except FileNotFoundError:
        raise InvalidDataset(f"no such file: {label}.") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, SyntaxError) as exc:
        raise InvalidDataset(f"{label} is not a readable .npz of plain arrays ({exc}); "
                             "save it with numpy.savez(path, x=images, y=labels).") from None
    _check_image_shape(x.shape, x.dtype)
    _check_label_shape(y.shape, y.dtype, x.shape[0])
    if max_bytes is not None and x.nbytes + y.nbytes > max_bytes:
        raise DatasetTooLarge(f"{label} holds {x.nbytes + y.nbytes} bytes of arrays once decompressed; the limit "
                              f"is {max_bytes} (ROBUSTIFY_MAX_DATASET_BYTES). Upload fewer or smaller images.")
    return x, y


def read_npz_arrays(path: str | Path, *, label: str | None = None, max_bytes: int | None = None,
                    max_classes: int = MAX_NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate the `x` and `y` arrays of an .npz file; never unpickles anything.

    `label` names the file in error messages (default: its path). The headers are checked
    first, so no array larger than the file (or than `max_bytes`) is ever allocated.
    """
    label = label or str(path)
    read_npz_headers(path, label=label, max_bytes=max_bytes)
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        # allow_pickle=False turns object arrays into a ValueError: pickles are never loaded.
        raise InvalidDataset(f"{label} is not a readable .npz of plain arrays ({exc}); "
                             "save it with numpy.savez(path, x=images, y=labels).") from None
    return validate_npz_arrays(x, y, max_classes=max_classes)


def summarize_npz(path: str | Path, *, label: str, max_bytes: int,
                  max_classes: int = MAX_NUM_CLASSES) -> dict[str, Any]:
    """num_examples, num_classes and image_shape [C, H, W] of a valid .npz, as the API stores
    them. Only the labels are loaded: the images are checked from their header and read through
    once to verify the archive's checksum, without being kept in memory."""
    x, _ = read_npz_headers(path, label=label, max_bytes=max_bytes)
    try:
        with zipfile.ZipFile(path) as zf, zf.open(_members(zf)["x"]) as fh:
            while fh.read(1 << 20):  # the zip module checks the CRC at the end
                pass
        with np.load(path, allow_pickle=False) as npz:
            y = npz["y"]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidDataset(f"{label} is not a readable .npz of plain arrays ({exc}); "
                             "save it with numpy.savez(path, x=images, y=labels).") from None
    labels = _check_labels(y, x.shape[0], max_classes)
    return {"num_examples": x.shape[0], "num_classes": int(labels.max()) + 1, "image_shape": _nchw(x.shape)}


@dataclass
class NpzDataset:
    """An .npz data set: x and y, optionally a stored test split and the class names."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    class_names: list[str] | None = None


def read_npz_dataset(path: str | Path, *, label: str | None = None) -> NpzDataset:
    """x and y (read_npz_arrays), plus the optional `x_test`/`y_test` (a stored split, e.g. of an
    image-folder upload) and `class_names` (text; label i is class_names[i])."""
    x, y = read_npz_arrays(path, label=label)
    label = label or str(path)
    data = NpzDataset(x, y)
    with np.load(path, allow_pickle=False) as npz:
        files = set(npz.files)
        if ("x_test" in files) != ("y_test" in files):
            raise InvalidDataset(f"{label} has only one of x_test and y_test; store both or neither.")
        try:
            if "x_test" in files:
                data.x_test, data.y_test = validate_npz_arrays(npz["x_test"], npz["y_test"])
            names = npz["class_names"] if "class_names" in files else None
        except ValueError as exc:  # an object array (a pickle) is refused by allow_pickle=False
            raise InvalidDataset(f"{label}: {exc}; store plain arrays.") from None
    if data.x_test is not None and data.x_test.shape[1:] != x.shape[1:]:
        raise InvalidDataset(f"{label}: test images are {list(data.x_test.shape[1:])} but training images are "
                             f"{list(x.shape[1:])}; they must have one shape.")
    if names is not None:
        if names.ndim != 1 or names.dtype.kind != "U":
            raise InvalidDataset(f"{label}: class_names must be a 1-D array of text, got {names.dtype} "
                                 f"{list(names.shape)}.")
        most = max(int(y.max()), int(data.y_test.max()) if data.y_test is not None else 0) + 1
        if len(names) < most:
            raise InvalidDataset(f"{label} names {len(names)} classes but its labels go up to {most - 1}.")
        data.class_names = [str(n) for n in names]
    return data


def stratified_split(y: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) holding about `test_fraction` of every class in the test part.

    Deterministic for a seed; both index arrays are shuffled so that "the first N test images"
    cover all classes even when the file is sorted by label.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InvalidDataset(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    if len(y) < 2:
        raise InvalidDataset(f"a data set needs at least 2 images to split into train and test, got {len(y)}.")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        # A class with two or more images gives at least one to each side.
        n_test = min(max(round(len(members) * test_fraction), 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    test_idx = np.concatenate(test)
    if len(test_idx) == 0:  # every class is a singleton: hold out one image anyway
        all_idx = rng.permutation(len(y))
        return all_idx[1:], all_idx[:1]
    train_idx = np.concatenate(train)
    return rng.permutation(train_idx), rng.permutation(test_idx)
