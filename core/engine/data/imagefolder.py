"""Image-folder data sets: a .zip or .tar of class folders, decoded into the project's .npz format.

Layouts (an optional single top folder around either is ignored):
    train/<class>/<image> and test/<class>/<image>   the given split is kept ("val" may stand for "test")
    <class>/<image>                                  split per class into train and test, seeded
Class names are the folder names; label i is the i-th name in sorted order (as torchvision's
ImageFolder does). Images are decoded with Pillow, converted to 1 (L) or 3 (RGB) channels and,
when an image size is given, scaled so that they cover it (aspect ratio kept) and centre-cropped
to it, which is torchvision's Resize + CenterCrop; without one, all images must have one size.

Nothing is extracted to disk. The archive is checked member by member before anything is
decoded: path traversal, links and other special members, files that are not images and an
uncompressed total over the cap are refused with a stable code; then every image must decode
and stay under the pixel limit (a decompression bomb is refused from its header, before its
pixels are decoded). macOS and Windows clutter (__MACOSX/, dot files, Thumbs.db, desktop.ini)
is skipped. numpy and Pillow only: the API process uses this module.
"""
from __future__ import annotations

import io
import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from core.engine.data.npz import MIN_IMAGE_SIZE, stratified_split, validate_npz_arrays
from core.errors import InvalidDataset

if TYPE_CHECKING:   # Pillow is imported where an image is decoded
    from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")   # no other decoder is reached
SKIPPED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
TEST_FOLDERS = ("test", "val", "validation")


class ArchiveError(InvalidDataset):
    """A refused archive; `code` says why (archive_path_traversal, archive_link, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


@dataclass(frozen=True)
class ImageFolderLimits:
    max_uncompressed_bytes: int        # the archive's members together
    max_image_pixels: int              # one image, width × height (Pillow's decompression-bomb limit)
    max_dataset_bytes: int             # the decoded uint8 arrays together
    max_member_bytes: int = 64 * 1024**2   # one member, uncompressed: the most one read holds in memory
    max_members: int = 200_000         # files and folders in the archive
    max_compression_ratio: float = 200.0   # uncompressed / compressed, for members above 1 MiB and a tar as a whole


@dataclass
class ImageFolderData:
    class_names: list[str]
    x: np.ndarray          # train images, uint8 N×C×H×W
    y: np.ndarray          # int64 labels
    x_test: np.ndarray
    y_test: np.ndarray
    split_given: bool      # train/ and test/ folders (else split here)

    @property
    def image_shape(self) -> list[int]:
        return [int(s) for s in self.x.shape[1:]]

    def save_npz(self, path: str | Path) -> None:
        """The project's own format: x, y, x_test, y_test and class_names (no pickles)."""
        with open(path, "wb") as fh:
            np.savez(fh, x=self.x, y=self.y, x_test=self.x_test, y_test=self.y_test,
                     class_names=np.array(self.class_names, dtype=str))


@dataclass(frozen=True)
class _Member:
    index: int             # position in the archive
    name: str
    size: int              # uncompressed bytes (0 for a folder)
    is_dir: bool


# Errors of zipfile, tarfile and their decompressors for a corrupt, truncated or encrypted archive.
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, RuntimeError, NotImplementedError,
                zlib.error, lzma.LZMAError)


# --- archive members ---------------------------------------------------------------------------

def archive_format(path: str | Path) -> str | None:
    """"zip" or "tar" from the file's first bytes (a .tar may be gzip, bzip2 or xz compressed), else None."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[257:262] == b"ustar" or head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return "tar"
    return None


def _check_name(name: str) -> None:
    # tarfile hands undecodable bytes back as lone surrogates; a name that is not text cannot be
    # a class name the API can answer with, so it is refused before anything is stored.
    if any("\ud800" <= ch <= "\udfff" or ord(ch) < 0x20 or ch == "\x7f" for ch in name):
        shown = name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise ArchiveError("archive_bad_name",
                           f"archive member {shown!r} has a name that is not valid UTF-8 text (or holds control "
                           "characters); rename it and build the archive again.")
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\x00" in name:
        raise ArchiveError("archive_path_traversal",
                           f"archive member {name!r} has an absolute or Windows-style path; members must be "
                           "relative paths with forward slashes, such as train/cat/0001.png.")
    if ".." in PurePosixPath(name).parts:
        raise ArchiveError("archive_path_traversal",
                           f"archive member {name!r} climbs out of the archive with '..'; rebuild the archive "
                           "from the data set's folder.")


def _link(name: str, target: str = "") -> ArchiveError:
    to = f" to {target!r}" if target else ""
    return ArchiveError("archive_link", f"archive member {name!r} is a link{to}; links are refused: put the "
                                        "image itself in the archive.")


def open_zip(path: Path) -> zipfile.ZipFile:
    """The zip's reader; a name flagged UTF-8 that is not (zipfile decodes every name on open) is
    archive_bad_name rather than an exception nobody expects."""
    try:
        return zipfile.ZipFile(path)
    except UnicodeDecodeError:
        raise ArchiveError("archive_bad_name", "a member's name is flagged as UTF-8 but is not valid UTF-8; rename "
                                               "it and build the archive again.") from None


def _bounded(limits: ImageFolderLimits, count: int, name: str, size: int) -> None:
    """Refuse, from the member's header and before its bytes are read, what would not fit in memory."""
    if count > limits.max_members:
        raise ArchiveError("archive_too_many_members",
                           f"the archive has more than {limits.max_members} members; split the data set.")
    if size > limits.max_member_bytes:
        raise ArchiveError("archive_too_large",
                           f"archive member {name!r} is {size} bytes uncompressed, over the limit of "
                           f"{limits.max_member_bytes} for one file; no image needs that much.")


def _bomb(name: str, ratio: float, limit: float) -> ArchiveError:
    return ArchiveError("archive_decompression_bomb",
                        f"{name} expands {ratio:.0f}-fold when decompressed, over the limit of {limit:.0f} "
                        "(a decompression bomb); image files are already compressed and do not.")


_RATIO_FLOOR = 1024 * 1024  # small members may compress well (a blank BMP); only large ones are judged


def scan_members(path: Path, kind: str, limits: ImageFolderLimits) -> list[_Member]:
    """Every member's name, size and type, checked for traversal, links, special files, their
    count, size and compression ratio, from the headers alone."""
    members = []
    if kind == "zip":
        with open_zip(path) as archive:
            for i, info in enumerate(archive.infolist()):
                _check_name(info.filename)
                _bounded(limits, i + 1, info.filename, info.file_size)
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > _RATIO_FLOOR and ratio > limits.max_compression_ratio:
                    raise _bomb(f"archive member {info.filename!r}", ratio, limits.max_compression_ratio)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise _link(info.filename)
                members.append(_Member(i, info.filename, info.file_size, info.is_dir()))
        return members
    compressed = max(path.stat().st_size, 1)
    total = 0
    with tarfile.open(path, "r:*") as tar:
        for i, entry in enumerate(tar):
            _check_name(entry.name)
            _bounded(limits, i + 1, entry.name, entry.size)
            total += entry.size
            if total > _RATIO_FLOOR and total / compressed > limits.max_compression_ratio:
                raise _bomb("the tar archive", total / compressed, limits.max_compression_ratio)
            if entry.issym() or entry.islnk():
                raise _link(entry.name, entry.linkname)
            if not (entry.isfile() or entry.isdir()):
                raise ArchiveError("archive_special_file",
                                   f"archive member {entry.name!r} is a device, FIFO or other special file; "
                                   "an image folder holds only folders and image files.")
            members.append(_Member(i, entry.name, entry.size, entry.isdir()))
    return members


def read_members(path: Path, kind: str, wanted: set[int]) -> Iterator[tuple[int, bytes]]:
    """The bytes of the wanted members, in archive order (one pass: a compressed tar is read once)."""
    if kind == "zip":
        with open_zip(path) as archive:
            for i, info in enumerate(archive.infolist()):
                if i in wanted:
                    yield i, archive.read(info)   # at most info.file_size bytes come out
        return
    with tarfile.open(path, "r|*") as tar:   # streaming mode: no seeking back in a compressed tar
        for i, entry in enumerate(tar):
            if i in wanted:
                handle = tar.extractfile(entry)
                assert handle is not None   # scan_members let through regular files only
                yield i, handle.read()


def _skipped(path: PurePosixPath) -> bool:
    return path.parts[0] == "__MACOSX" or any(p.startswith(".") for p in path.parts) \
        or path.name.lower() in SKIPPED_NAMES


# --- layout --------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """Which member is which image: (split, class) per file, in archive order."""

    files: list[tuple[str, str, _Member]]     # (split "train" | "test" | "all", class, member)
    folders: dict[tuple[str, str], int]       # (split, class) -> images in it
    split_given: bool


def _strip_common_root(paths: list[PurePosixPath]) -> int:
    """How many leading folders every path shares that are a mere wrapper (e.g. "my-data/")."""
    depth = 0
    # strip while every path is <wrapper>/<class>/<file> or deeper below the same wrapper folder
    while paths and all(len(p.parts) >= depth + 3 for p in paths):
        firsts = {p.parts[depth] for p in paths}
        if len(firsts) != 1 or next(iter(firsts)).lower() in ("train", *TEST_FOLDERS):
            break
        depth += 1
    return depth


def _plan(found: tuple[list[tuple[PurePosixPath, _Member]], list[PurePosixPath]]) -> _Plan:
    members, dirs = found
    everything = [p for p, _ in members] + dirs
    depth = _strip_common_root([p for p, _ in members] or dirs)
    tops = {p.parts[depth].lower() for p in everything if len(p.parts) > depth}
    split_given = "train" in tops and bool(tops & set(TEST_FOLDERS))
    if split_given and (tops - {"train", *TEST_FOLDERS} or len(tops & set(TEST_FOLDERS)) > 1):
        raise ArchiveError("archive_layout",
                           f"the archive's top folders are {sorted(tops)}: use either train/<class>/ and "
                           "test/<class>/ (or val/<class>/), or class folders only.")
    folders: dict[tuple[str, str], int] = {}
    for d in dirs:
        rest = d.parts[depth:]
        if split_given and len(rest) >= 2:
            folders.setdefault(("train" if rest[0].lower() == "train" else "test", rest[1]), 0)
        elif not split_given and len(rest) >= 1:
            folders.setdefault(("all", rest[0]), 0)
    files: list[tuple[str, str, _Member]] = []
    for path, member in members:
        rest = path.parts[depth:]
        if len(rest) < (3 if split_given else 2):
            where = "train/<class>/ or test/<class>/" if split_given else "a class folder"
            raise ArchiveError("archive_layout", f"{member.name!r} is not inside {where}; every image must be "
                                                 "in the folder named after its class.")
        split = ("train" if rest[0].lower() == "train" else "test") if split_given else "all"
        cls = rest[1] if split_given else rest[0]
        files.append((split, cls, member))
        folders[(split, cls)] = folders.get((split, cls), 0) + 1
    return _Plan(files, folders, split_given)


def _class_names(plan: _Plan) -> list[str]:
    empty = sorted(f"{s}/{c}" if plan.split_given else c for (s, c), n in plan.folders.items() if n == 0)
    if empty:
        raise ArchiveError("archive_empty_class", f"class folder(s) {', '.join(empty)} hold no images; "
                                                  "remove them or add images.")
    train = sorted({c for (s, c) in plan.folders if s in ("train", "all")})
    stray = sorted({c for (s, c) in plan.folders if s == "test"} - set(train))
    if stray:
        raise ArchiveError("archive_layout", f"test/ has class(es) {', '.join(stray)} that train/ lacks; "
                                             "every test class needs training images.")
    if len(train) < 2:
        raise ArchiveError("archive_layout", f"a classifier needs at least 2 class folders; found {train or 'none'}.")
    return train


# --- decoding ------------------------------------------------------------------------------------

def _fit(image: Image.Image, size: tuple[int, int] | None, resample: Image.Resampling) -> Image.Image:
    """Scale to cover (height, width) with the aspect ratio kept, centre-cropped to it."""
    if size is None:
        return image
    height, width = size
    w, h = image.size
    scale = max(width / w, height / h)
    crop_w, crop_h = width / scale, height / scale
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return image.resize((width, height), resample, box=(left, top, left + crop_w, top + crop_h))


def decode_image(data: bytes, *, name: str, channels: int, size: tuple[int, int] | None,
                 max_pixels: int, check_header: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One image file → uint8 C×H×W (resized when `size` is given). `check_header(width, height)`
    may refuse the image from its header, before a pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        image: Image.Image   # the opened file, then plain images as it is converted
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
            w, h = image.size
            if w * h > max_pixels:
                raise ArchiveError("archive_decompression_bomb",
                                   f"{name!r} claims {w}×{h} pixels, over the limit of {max_pixels} per image "
                                   "(a decompression bomb, or simply too large); shrink it before uploading.")
            if check_header is not None:
                check_header(w, h)
            if size is not None and image.format == "JPEG":
                image.draft("L" if channels == 1 else "RGB", (size[1], size[0]))  # decode big JPEGs at a lower scale
            if image.mode.startswith("I;16"):
                image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8))
            elif image.mode in ("P", "PA") and "transparency" in image.info:
                image = image.convert("RGBA")
            image = image.convert("L" if channels == 1 else "RGB")
            image = _fit(image, size, Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ArchiveError("archive_decompression_bomb", f"{name!r} is a decompression bomb ({exc}).") from None
    except UnidentifiedImageError:
        raise ArchiveError("archive_undecodable_image",
                           f"{name!r} is not a {', '.join(PILLOW_FORMATS)} image Pillow can read; replace or "
                           "remove it.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated or corrupt files with these (SyntaxError for broken headers)
        raise ArchiveError("archive_undecodable_image",
                           f"{name!r} cannot be decoded as an image ({type(exc).__name__}: {exc}); "
                           "replace or remove it.") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def read_image_folder(path: str | Path, *, limits: ImageFolderLimits, image_size: tuple[int, int] | None = None,
                      channels: int = 3, test_fraction: float = 0.2, seed: int = 0) -> ImageFolderData:
    """Check and decode an image-folder archive (see the module docstring); ArchiveError when refused."""
    if channels not in (1, 3):
        raise InvalidDataset(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if image_size is not None and min(image_size) < MIN_IMAGE_SIZE:
        raise InvalidDataset(f"image_size must be at least {MIN_IMAGE_SIZE}, got {list(image_size)}.")
    path = Path(path)
    kind = archive_format(path)
    if kind is None:
        raise ArchiveError("archive_unreadable", "the file is neither a .zip nor a .tar archive.")
    try:
        plan = _plan(_image_members(scan_members(path, kind, limits), limits))
        names = _class_names(plan)
        if image_size is not None:
            need = len(plan.files) * channels * image_size[0] * image_size[1]
            if need > limits.max_dataset_bytes:
                raise ArchiveError("archive_too_large",
                                   f"{len(plan.files)} images of {channels}×{image_size[0]}×{image_size[1]} need "
                                   f"{need} bytes, over the limit of {limits.max_dataset_bytes} "
                                   "(ROBUSTIFY_MAX_DATASET_BYTES); upload them with a smaller image_size.")
        data = _decode_all(path, kind, plan, names, limits, image_size, channels)
    except _READ_ERRORS as exc:
        raise ArchiveError("archive_unreadable", f"the {kind} archive is corrupt, truncated or encrypted "
                                                 f"({type(exc).__name__}: {exc}); build it again.") from None
    return _split(data, names, plan.split_given, test_fraction, seed)


def _image_members(members: list[_Member], limits: ImageFolderLimits
                   ) -> tuple[list[tuple[PurePosixPath, _Member]], list[PurePosixPath]]:
    """(image files, folders) without the clutter; refuses other files and an oversize total."""
    files: list[tuple[PurePosixPath, _Member]] = []
    dirs: list[PurePosixPath] = []
    total = 0
    for member in members:
        path = PurePosixPath(member.name)
        if not path.parts or _skipped(path):
            continue
        if member.is_dir:
            dirs.append(path)
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ArchiveError("archive_non_image",
                               f"archive member {member.name!r} is not an image file (allowed: "
                               f"{', '.join(sorted(IMAGE_EXTENSIONS))}); remove it from the archive.")
        total += member.size
        if total > limits.max_uncompressed_bytes:
            raise ArchiveError("archive_too_large",
                               f"the archive's files add up to more than {limits.max_uncompressed_bytes} bytes "
                               "uncompressed (ROBUSTIFY_MAX_ARCHIVE_BYTES); split the data set or shrink its images.")
        files.append((path, member))
    return files, dirs


def _decode_all(path: Path, kind: str, plan: _Plan, names: list[str], limits: ImageFolderLimits,
                image_size: tuple[int, int] | None, channels: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    label = {name: i for i, name in enumerate(names)}
    where = {member.index: (split, cls, member.name) for split, cls, member in plan.files}
    images: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[int]] = {}
    shape: tuple[int, ...] | None = None
    total = 0
    def check_header(name: str) -> Callable[[int, int], None]:
        def check(width: int, height: int) -> None:
            out = (height, width) if image_size is None else image_size
            if shape is not None and (shape[1], shape[2]) != out:
                raise ArchiveError("archive_mixed_sizes",
                                   f"{name!r} is {width}×{height} but earlier images are {shape[2]}×{shape[1]}; "
                                   "give image_size to resize them all to one size.")
            if total + channels * out[0] * out[1] > limits.max_dataset_bytes:
                raise ArchiveError("archive_too_large",
                                   f"the decoded images need more than {limits.max_dataset_bytes} bytes "
                                   "(ROBUSTIFY_MAX_DATASET_BYTES); upload them with a smaller image_size.")
        return check

    for index, content in read_members(path, kind, set(where)):
        split, cls, name = where[index]
        pixels = decode_image(content, name=name, channels=channels, size=image_size,
                              max_pixels=limits.max_image_pixels, check_header=check_header(name))
        shape = shape or pixels.shape
        total += pixels.nbytes
        images.setdefault(split, []).append(pixels)
        labels.setdefault(split, []).append(label[cls])
    return {split: (np.stack(images[split]), np.asarray(labels[split], dtype=np.int64)) for split in images}


def _split(data: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str], split_given: bool,
           test_fraction: float, seed: int) -> ImageFolderData:
    if split_given:
        x, y = data["train"]
        if "test" not in data:
            raise ArchiveError("archive_empty_class", "test/ holds no images; add test images or drop test/ "
                                                      "to have the service split the data.")
        x_test, y_test = data["test"]
    else:
        x_all, y_all = data["all"]
        train_idx, test_idx = stratified_split(y_all, test_fraction=test_fraction, seed=seed)
        x, y, x_test, y_test = x_all[train_idx], y_all[train_idx], x_all[test_idx], y_all[test_idx]
    x, y = validate_npz_arrays(x, y)
    x_test, y_test = validate_npz_arrays(x_test, y_test)
    return ImageFolderData(class_names=names, x=x, y=y, x_test=x_test, y_test=y_test, split_given=split_given)
