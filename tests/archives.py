"""Image-folder archives for the tests, written here with Pillow, zipfile and tarfile (no torch).

`bad_archives()` is every refused kind of archive with the stable code it must get; the core,
service and end-to-end tests all try the same set.
"""
from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "emu")


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG of uint8 pixels (H×W grayscale or H×W×3 RGB)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def class_image(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB image whose mean colour says its class (so a model can learn it), with noise."""
    base = np.zeros(3, dtype=np.float64)
    base[label % 3] = 200.0
    noise = rng.normal(0.0, 20.0, size=(height, width, 3))
    return np.clip(base + 30.0 + noise, 0, 255).astype(np.uint8)


def zip_bytes(entries: dict[str, bytes | None], symlinks: dict[str, str] | None = None) -> bytes:
    """A zip of files (None: a folder entry) and, optionally, symbolic links name -> target."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, b"" if content is None else content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3   # Unix, so that the mode bits below mean what they say
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buf.getvalue()


def add_tar_entries(archive: tarfile.TarFile, entries: dict[str, bytes | None]) -> None:
    """Files (None: a folder) into an open tar."""
    for name, content in entries.items():
        info = tarfile.TarInfo(name)
        if content is None:
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        else:
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))


def tar_bytes(entries: dict[str, bytes | None], *, links: dict[str, tuple[bytes, str]] | None = None,
              mode: str = "w") -> bytes:
    """A tar of files (None: a folder) and special members name -> (tarfile type, link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as archive:
        add_tar_entries(archive, entries)
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            archive.addfile(info)
    return buf.getvalue()


def folder_entries(*, classes: tuple[str, ...] = CLASSES, per_class: int = 4,
                   sizes: tuple[tuple[int, int], ...] = ((40, 30), (24, 24)), split: bool = False,
                   root: str = "", seed: int = 0) -> dict[str, bytes | None]:
    """Class folders of PNG and JPEG images in alternating sizes (width, height); with split,
    train/<class>/ gets per_class images and test/<class>/ half as many."""
    rng = np.random.default_rng(seed)
    entries: dict[str, bytes | None] = {}
    parts = (("train/", per_class), ("test/", max(per_class // 2, 1))) if split else (("", per_class),)
    for prefix, count in parts:
        for label, cls in enumerate(classes):
            entries[f"{root}{prefix}{cls}/"] = None
            for i in range(count):
                w, h = sizes[i % len(sizes)]
                pixels = class_image(label, w, h, rng)
                data, ext = (jpeg_bytes(pixels), "jpg") if i % 3 == 2 else (png_bytes(pixels), "png")
                entries[f"{root}{prefix}{cls}/{i:03d}.{ext}"] = data
    return entries


def bmp_bytes(pixels: np.ndarray) -> bytes:
    """An uncompressed BMP: its size in the archive is its size on disk, however well it zips."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "BMP")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A small, valid PNG whose header claims width × height pixels (a decompression bomb's header)."""
    raw = png_bytes(np.zeros((1, 1), dtype=np.uint8))
    ihdr = raw.index(b"IHDR")
    body = struct.pack(">II", width, height) + raw[ihdr + 12:ihdr + 17]
    chunk = b"IHDR" + body
    patched = chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return raw[:ihdr] + patched + raw[ihdr + len(patched):]


def tar_with_raw_name(entries: dict[str, bytes | None], raw_name: bytes, content: bytes) -> bytes:
    """A tar holding, besides `entries`, a member whose name has bytes that are not UTF-8."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as archive:
        add_tar_entries(archive, {**entries, raw_name.decode("utf-8", "surrogateescape"): content})
    return buf.getvalue()


def zip_with_invalid_utf8_name(entries: dict[str, bytes | None], image: bytes) -> bytes:
    """A zip whose extra member's name is flagged UTF-8 (bit 11) but holds \\xff\\xfe."""
    marker = "cat/\u00e9\u00e9.png"          # non-ASCII, so zipfile sets the UTF-8 flag
    data = zip_bytes({**entries, marker: image})
    return data.replace(marker.encode("utf-8"), b"cat/\xff\xfe\xff\xfe.png")


def zeros_member_zip(entries: dict[str, bytes | None], size: int) -> bytes:
    """A small zip with one member of `size` zero bytes named like an image (memory amplification)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, b"" if content is None else content)
        with archive.open("dog/zeros.png", "w", force_zip64=True) as fh:
            chunk = bytes(1024 * 1024)
            for _ in range(size // len(chunk)):
                fh.write(chunk)
    return buf.getvalue()


def bad_archives(max_archive_bytes: int) -> dict[str, tuple[str, bytes]]:
    """name -> (expected code, archive bytes); `max_archive_bytes` is the server's uncompressed cap."""
    good = folder_entries(per_class=2, sizes=((16, 16),))
    image = next(v for v in good.values() if v)
    big = bmp_bytes(np.zeros((128, 128, 3), dtype=np.uint8))   # 48 KiB each, a few hundred bytes zipped
    n_big = max_archive_bytes // len(big) + 2
    return {
        "zip path traversal": ("archive_path_traversal", zip_bytes({**good, "../evil/x.png": image})),
        "tar absolute path": ("archive_path_traversal", tar_bytes({**good, "/etc/cat/x.png": image})),
        "zip symlink": ("archive_link", zip_bytes(good, symlinks={"cat/link.png": "/etc/passwd"})),
        "tar symlink": ("archive_link", tar_bytes(good, links={"cat/link.png": (tarfile.SYMTYPE, "/etc/passwd")})),
        "tar hard link": ("archive_link", tar_bytes(good, links={"dog/hard.png": (tarfile.LNKTYPE, "cat/000.png")})),
        "tar fifo": ("archive_special_file", tar_bytes(good, links={"dog/pipe.png": (tarfile.FIFOTYPE, "")})),
        "non-image file": ("archive_non_image", zip_bytes({**good, "cat/notes.txt": b"not an image"})),
        "undecodable image": ("archive_undecodable_image", zip_bytes({**good, "dog/broken.png": b"\x89PNG junk"})),
        "truncated image": ("archive_undecodable_image", zip_bytes({**good, "dog/cut.png": image[: len(image) // 2]})),
        "decompression bomb": ("archive_decompression_bomb", zip_bytes({**good, "emu/bomb.png": bomb_png()})),
        "over the uncompressed cap": ("archive_too_large", zip_bytes(
            {f"{c}/{i:04d}.bmp": big for c in ("a", "b") for i in range(n_big // 2 + 1)})),
        "empty class": ("archive_empty_class", zip_bytes({**good, "fox/": None, "fox/.DS_Store": b"\0"})),
        "image outside a class folder": ("archive_layout", zip_bytes({**good, "stray.png": image})),
        "one class": ("archive_layout", zip_bytes({"cat/1.png": image, "cat/2.png": image})),
        "corrupt archive": ("archive_unreadable", zip_bytes(good)[:200] + b"\0" * 100),
        "tar name not UTF-8": ("archive_bad_name", tar_with_raw_name(good, b"cat/\xff\xfe.png", image)),
        "zip name flagged UTF-8 but not": ("archive_bad_name", zip_with_invalid_utf8_name(good, image)),
        "zeros member, 200-fold compressed": ("archive_decompression_bomb", zeros_member_zip(good, 8 * 1024 * 1024)),
        "tar.gz of zeros": ("archive_decompression_bomb", tar_bytes(
            {**good, "dog/zeros.png": bytes(8 * 1024 * 1024)}, mode="w:gz")),
    }
