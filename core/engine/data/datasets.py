"""Image data sets as uint8 tensors, and the on-device augmentation used while training.

Built-ins: CIFAR-10/100 (torchvision's on-disk format, read with a restricted unpickler),
Fashion-MNIST (IDX files), scikit-learn's digits (bundled, no download). Anything else is a
path to an `.npz` with `x` (uint8 images) and `y` (integer labels), and optionally its own test
split (`x_test`, `y_test`) and `class_names`, as image-folder uploads are stored. The whole data
set is kept as one tensor so that training moves it to the device once and augments it there.
"""
from __future__ import annotations

import gzip
import logging
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.engine.data.npz import read_npz_dataset, stratified_split, validate_npz_arrays
from core.errors import DatasetUnavailable, InvalidDataset

__all__ = [
    "BUILTIN_DATASETS", "ImageData", "augment_crop_flip", "is_cifar_like", "load_dataset", "load_npz",
    "to_unit_float", "validate_npz_arrays",
]

log = logging.getLogger(__name__)

BUILTIN_DATASETS = ("cifar10", "cifar100", "fashion-mnist", "digits")

# Debian's dataset-fashion-mnist package installs the gzipped IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageData:
    name: str
    train_x: torch.Tensor   # uint8 (N, C, H, W), CPU, contiguous
    train_y: torch.Tensor   # int64 (N,)
    test_x: torch.Tensor    # uint8 (M, C, H, W)
    test_y: torch.Tensor    # int64 (M,)
    num_classes: int
    class_names: list[str] | None = None   # label i is class_names[i], when the data set names them

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)


def _image_data(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                num_classes: int | None = None) -> ImageData:
    if num_classes is None:
        num_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    return ImageData(name=name, train_x=_tensor(train_x, np.uint8), train_y=_tensor(train_y, np.int64),
                     test_x=_tensor(test_x, np.uint8), test_y=_tensor(test_y, np.int64), num_classes=num_classes)


def _tensor(a: np.ndarray, dtype: type) -> torch.Tensor:
    a = np.ascontiguousarray(a, dtype=dtype)
    if not a.flags.writeable:  # e.g. np.frombuffer over file bytes; torch wants its own memory
        a = a.copy()
    return torch.from_numpy(a)


def load_dataset(name: str, *, data_dir: str | Path, allow_download: bool = False) -> ImageData:
    """A built-in data set by name (see BUILTIN_DATASETS), or an .npz file by path."""
    key = name.strip().lower().replace("_", "-")
    data_dir = Path(data_dir)
    if key == "digits":
        return load_digits()
    if key in ("cifar10", "cifar100"):
        return load_cifar(key, data_dir=data_dir, allow_download=allow_download)
    if key in ("fashion-mnist", "fashionmnist"):
        return load_fashion_mnist(data_dir=data_dir, allow_download=allow_download)
    path = Path(name)
    if path.suffix.lower() == ".npz" or path.is_file():
        return load_npz(path)
    raise DatasetUnavailable(f"unknown data set {name!r}: use one of {', '.join(BUILTIN_DATASETS)} "
                             "or the path to an .npz file with arrays x (uint8 images) and y (labels).")


# --- .npz ----------------------------------------------------------------------------------------

def load_npz(path: str | Path, *, name: str | None = None, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """An .npz of `x` and `y`, split per class into train and test (deterministic for a seed),
    or with its own `x_test` and `y_test` (an image-folder upload), and `class_names` if named."""
    npz = read_npz_dataset(path)
    name = name or Path(path).stem
    if npz.x_test is not None and npz.y_test is not None:
        x, y, x_test, y_test = npz.x, npz.y, npz.x_test, npz.y_test
    else:
        train_idx, test_idx = stratified_split(npz.y, test_fraction=test_fraction, seed=seed)
        x, y, x_test, y_test = npz.x[train_idx], npz.y[train_idx], npz.x[test_idx], npz.y[test_idx]
    num_classes = len(npz.class_names) if npz.class_names else int(max(y.max(), y_test.max())) + 1
    data = _image_data(name, x, y, x_test, y_test, num_classes=num_classes)
    data.class_names = npz.class_names
    return data


# --- digits --------------------------------------------------------------------------------------

def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8×8 digits (1797 images, values 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, test_fraction=test_fraction, seed=seed)
    return _image_data("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx], num_classes=10)


# --- CIFAR ---------------------------------------------------------------------------------------

_CIFAR = {
    # name: (folder, train files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}

# Globals that numpy's array pickles reference (numpy 1 and numpy 2 spellings), and the one that
# Python 3 uses to write bytes at pickle protocol 2 (a pure text-to-bytes encoder); nothing else.
_NUMPY_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays; refuses every other global.

    CIFAR's batches are pickles; a plain pickle.load would run whatever code a tampered file names.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise _RefusedGlobal(f"refusing to load {module}.{name}: only numpy array data is allowed")
        if module == "_codecs":
            return _encode_text
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 moved numpy.core
        return super().find_class(module, name)


def _encode_text(text: str, encoding: str = "utf-8") -> bytes:
    # _codecs.encode restricted to text encodings, so a pickle cannot reach the bytes-to-bytes codecs.
    if not isinstance(text, str):
        raise _RefusedGlobal("_codecs.encode in a CIFAR pickle may only encode text")
    return text.encode(encoding)


def read_cifar_batch(path: str | Path, label_key: bytes = b"labels") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file: (images uint8 N×3×32×32, labels int64 N)."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise InvalidDataset(f"{path} is not a plain CIFAR batch ({exc}); delete it and download the "
                             "CIFAR files again.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise InvalidDataset(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); delete it and "
                             "download the CIFAR files again.") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise InvalidDataset(f"{path} is not a CIFAR batch: expected a dict with keys b'data' and {label_key!r}.")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise InvalidDataset(f"{path}: b'data' must be uint8 N×3072 with one label per row, got "
                             f"{data.dtype} {list(data.shape)} and {len(labels)} labels.")
    # CIFAR stores each row as the 1024 red, then green, then blue values.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar(name: str, *, data_dir: str | Path, allow_download: bool = False) -> ImageData:
    folder_name, train_files, test_files, label_key, classes = _CIFAR[name]
    folder = Path(data_dir) / folder_name
    expected = [folder / f for f in train_files + test_files]
    if not all(p.is_file() for p in expected):
        if not allow_download:
            raise DatasetUnavailable(
                f"{name} is not under {folder}: place torchvision's CIFAR files there ({folder_name}/"
                f"{', '.join(train_files + test_files)}), or allow downloads (ROBUSTIFY_ALLOW_DOWNLOAD=1).")
        _download_cifar(name, Path(data_dir))
    parts = [read_cifar_batch(folder / f, label_key) for f in train_files]
    test_x, test_y = read_cifar_batch(folder / test_files[0], label_key)
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    for y in (train_y, test_y):
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise InvalidDataset(f"{folder} has labels outside 0..{classes - 1}; delete it and download again.")
    return _image_data(name, train_x, train_y, test_x, test_y, num_classes=classes)


def _download_cifar(name: str, data_dir: Path) -> None:
    # torchvision's URL and checksum, but not its CIFAR10 class: that would plainly unpickle the files.
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    spec = CIFAR10 if name == "cifar10" else CIFAR100
    log.info("downloading %s from %s into %s", name, spec.url, data_dir)
    try:
        download_and_extract_archive(spec.url, str(data_dir), filename=spec.filename, md5=spec.tgz_md5)
    except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError...)
        raise DatasetUnavailable(
            f"downloading {name} into {data_dir} failed ({type(exc).__name__}: {exc}); download "
            f"{spec.url} yourself and extract it under {data_dir}.") from None


# --- Fashion-MNIST (IDX) -------------------------------------------------------------------------

_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped when the name ends in .gz) of unsigned bytes, as a numpy array."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InvalidDataset(f"{path} cannot be read ({exc}); replace it with the original IDX file.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise InvalidDataset(f"{path} is not an IDX file (bad magic number); replace it with the original file.")
    type_code, ndim = raw[2], raw[3]
    if type_code != 0x08:
        raise InvalidDataset(f"{path} holds IDX type 0x{type_code:02x}; only unsigned bytes (0x08) are supported.")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise InvalidDataset(f"{path} has a truncated IDX header; replace it with the original file.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])  # big-endian sizes
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise InvalidDataset(f"{path} should hold {count} bytes of data for shape {list(dims)} but holds "
                             f"{len(raw) - header}; the file is truncated or corrupt.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_fashion_folder(data_dir: Path) -> Path | None:
    candidates = [data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
    for folder in candidates:
        if all(_idx_path(folder, f) is not None for f in _FASHION_FILES):
            return folder
    return None


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(*, data_dir: str | Path, allow_download: bool = False) -> ImageData:
    data_dir = Path(data_dir)
    folder = _find_fashion_folder(data_dir)
    if folder is None:
        target = data_dir / "fashion-mnist"
        if not allow_download:
            raise DatasetUnavailable(
                f"fashion-mnist is not under {target} (nor {DEBIAN_FASHION_MNIST}): place the four IDX files "
                f"({', '.join(_FASHION_FILES)}, optionally .gz) there, install Debian's dataset-fashion-mnist, "
                "or allow downloads (ROBUSTIFY_ALLOW_DOWNLOAD=1).")
        _download_fashion_mnist(target)
        folder = target
    arrays = [read_idx(_idx_path(folder, f)) for f in _FASHION_FILES]  # type: ignore[arg-type]
    train_x, train_y, test_x, test_y = arrays
    for images, labels, part in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise InvalidDataset(f"{folder}: the {part} files disagree ({list(images.shape)} images, "
                                 f"{list(labels.shape)} labels); replace them with the original files.")
        if len(labels) and labels.max() >= 10:
            raise InvalidDataset(f"{folder}: {part} labels must be 0..9; replace the files with the original ones.")
    return _image_data("fashion-mnist", train_x[:, None], train_y, test_x[:, None], test_y, num_classes=10)


def _download_fashion_mnist(target: Path) -> None:
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    log.info("downloading fashion-mnist into %s", target)
    errors = []
    for filename, md5 in FashionMNIST.resources:
        for mirror in FashionMNIST.mirrors:
            try:
                download_url(f"{mirror}{filename}", str(target), filename=filename, md5=md5)
                break
            except Exception as exc:  # try the next mirror on any network error
                errors.append(f"{mirror}{filename}: {type(exc).__name__}: {exc}")
        else:
            raise DatasetUnavailable(f"downloading fashion-mnist into {target} failed ({errors[-1]}); place the "
                                     "IDX files there yourself.")


# --- tensors for training ------------------------------------------------------------------------

def to_unit_float(x: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """uint8 images → floats in [0, 1] on `device` (moved as uint8: a quarter of the bytes)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_unit_float expects uint8 images, got {x.dtype}")
    return x.to(device, non_blocking=True).to(dtype).div_(255.0)


@dataclass(frozen=True)
class CropFlip:
    """The random crop (offsets into the zero-padded image) and flip drawn for each image of a batch."""

    offset_y: torch.Tensor   # (B,) rows skipped in the padded image
    offset_x: torch.Tensor   # (B,) columns skipped
    flip: torch.Tensor       # (B,) bool: mirrored left-right
    pad: int

    def _indices(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.offset_y.device
        rows = self.offset_y[:, None] + torch.arange(h, device=device)                # (B, H) in padded coordinates
        cols_ahead = torch.arange(w, device=device)
        cols = self.offset_x[:, None] + torch.where(self.flip[:, None], w - 1 - cols_ahead, cols_ahead)  # (B, W)
        batch = torch.arange(rows.shape[0], device=device)[:, None, None]
        return batch, rows[:, :, None], cols[:, None, :]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The crop-and-flipped batch (the padding is zeros)."""
        if x.ndim != 4:
            raise ValueError(f"augment_crop_flip expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        _, _, h, w = x.shape
        pad = self.pad
        padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
        batch, rows, cols = self._indices(h, w)
        # Advanced indices around the channel slice put their dims first: (B, H, W, C).
        out = padded[batch, :, rows, cols].permute(0, 3, 1, 2)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def undo(self, seen: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Back to the un-augmented frame: `into` (B, C, H, W) with every pixel that the crop showed
        replaced by its value in `seen` (the augmented batch); pixels cropped away keep `into`'s."""
        _, _, h, w = into.shape
        pad = self.pad
        padded = F.pad(into, (pad, pad, pad, pad)) if pad > 0 else into.clone()
        batch, rows, cols = self._indices(h, w)
        padded[batch, :, rows, cols] = seen.permute(0, 2, 3, 1).to(padded.dtype)
        return padded[:, :, pad:pad + h, pad:pad + w].contiguous()


def crop_flip_draw(batch: int, *, pad: int = 4, generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu") -> CropFlip:
    """Draw a random crop (after zero padding by `pad`) and a random horizontal flip per image."""
    offset_y = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    offset_x = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return CropFlip(offset_y, offset_x, flip, pad)


def augment_crop_flip(x: torch.Tensor, *, pad: int = 4, generator: torch.Generator | None = None,
                      draw: CropFlip | None = None) -> torch.Tensor:
    """Random crop after zero padding by `pad`, and a random horizontal flip, per image.

    One gather on x's device for the whole batch; deterministic for a given generator (which
    must live on x's device). `draw`: apply these crops and flips instead of drawing new ones.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_crop_flip expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    draw = draw or crop_flip_draw(x.shape[0], pad=pad, generator=generator, device=x.device)
    return draw.apply(x)


def is_cifar_like(image_shape: tuple[int, ...] | torch.Size) -> bool:
    """32×32 RGB: the shape where crop-and-flip augmentation is the standard choice."""
    return tuple(int(s) for s in image_shape) == (3, 32, 32)
