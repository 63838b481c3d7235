"""Checks and splits for image data sets held as numpy arrays (no torch).

The API validates uploaded `.npz` files with these functions before it stores them, and the
worker's `core.data.load_npz` uses the same ones, so an upload that the API accepted loads.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import InvalidDataset

MIN_IMAGE_SIZE = 8          # the 8x8 digits are the smallest images the zoo's models take
ALLOWED_CHANNELS = (1, 3)   # grayscale or RGB


def validate_npz_arrays(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check images `x` and labels `y`; return x as N×C×H×W uint8 and y as int64 (both contiguous).

    x may be N×H×W (grayscale), N×H×W×C or N×C×H×W with C in (1, 3). Raises InvalidDataset with
    a message saying what is wrong and how to fix it.
    """
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise InvalidDataset("x and y must be numpy arrays; save them with numpy.savez(path, x=images, y=labels).")
    if x.dtype != np.uint8:
        hint = " (scale [0, 1] floats with (x * 255).round().astype(numpy.uint8))" if x.dtype.kind == "f" else ""
        raise InvalidDataset(f"x must hold uint8 pixel values 0..255, got dtype {x.dtype}{hint}.")
    if x.ndim not in (3, 4):
        raise InvalidDataset(f"x must be N×H×W, N×H×W×C or N×C×H×W, got {x.ndim} dimensions (shape {list(x.shape)}).")
    if x.shape[0] == 0:
        raise InvalidDataset("x holds no images; the data set must contain at least one image.")
    x = _to_nchw(x)
    _, _, height, width = x.shape
    if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
        raise InvalidDataset(f"images are {height}×{width}; they must be at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} pixels.")
    return np.ascontiguousarray(x), _check_labels(y, len(x))


def _to_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    channels_first, channels_last = x.shape[1] in ALLOWED_CHANNELS, x.shape[3] in ALLOWED_CHANNELS
    # When both could be channels the image is at most 3 pixels wide; the size check rejects it.
    if channels_last:
        return x.transpose(0, 3, 1, 2)
    if channels_first:
        return x
    raise InvalidDataset(f"x has shape {list(x.shape)}: images need 1 (grayscale) or 3 (RGB) channels, "
                         "as the second or the last dimension.")


def _check_labels(y: np.ndarray, num_images: int) -> np.ndarray:
    if y.ndim != 1:
        raise InvalidDataset(f"y must be a 1-D array of class labels, got shape {list(y.shape)}.")
    if y.dtype.kind not in "iu":
        raise InvalidDataset(f"y must hold integer class labels 0..K-1, got dtype {y.dtype}.")
    if len(y) != num_images:
        raise InvalidDataset(f"x has {num_images} images but y has {len(y)} labels; they must match one to one.")
    if y.min() < 0:
        raise InvalidDataset(f"labels must be ≥ 0 (classes 0..K-1), found {int(y.min())}.")
    return np.ascontiguousarray(y, dtype=np.int64)


def read_npz_arrays(path: str | Path, *, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate the `x` and `y` arrays of an .npz file; never unpickles anything.

    `label` names the file in error messages (default: its path).
    """
    label = label or str(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = sorted({"x", "y"} - set(npz.files))
            if missing:
                raise InvalidDataset(f"{label} has no array named {', '.join(missing)}; "
                                     "save it with numpy.savez(path, x=images, y=labels).")
            x, y = npz["x"], npz["y"]
    except InvalidDataset:
        raise
    except FileNotFoundError:
        raise InvalidDataset(f"no such file: {label}.") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        # allow_pickle=False turns object arrays into a ValueError: pickles are never loaded.
        raise InvalidDataset(f"{label} is not a readable .npz of plain arrays ({exc}); "
                             "save it with numpy.savez(path, x=images, y=labels).") from None
    return validate_npz_arrays(x, y)


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
        n_test = min(max(int(round(len(members) * test_fraction)), 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    test_idx = np.concatenate(test)
    if len(test_idx) == 0:  # every class is a singleton: hold out one image anyway
        all_idx = rng.permutation(len(y))
        return all_idx[1:], all_idx[:1]
    train_idx = np.concatenate(train)
    return rng.permutation(train_idx), rng.permutation(test_idx)
