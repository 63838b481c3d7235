"""Image-folder archives (zip and tar written here with Pillow) into the project's .npz format."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from core.engine.data.datasets import load_npz
from core.engine.data.imagefolder import ArchiveError, ImageFolderLimits, read_image_folder
from core.errors import InvalidDataset
from tests.archives import (
    CLASSES,
    bad_archives,
    folder_entries,
    png_bytes,
    tar_bytes,
    zip_bytes,
)

LIMITS = ImageFolderLimits(max_uncompressed_bytes=200_000, max_image_pixels=89_478_485, max_dataset_bytes=10**8)


def _write(tmp_path: Path, data: bytes, name: str = "data.zip") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_class_folders_are_split_per_class_with_a_seed(tmp_path: Path) -> None:
    entries = folder_entries(per_class=5, root="my-photos/")    # a wrapper folder, as zipping a folder makes
    path = _write(tmp_path, zip_bytes({**entries, "my-photos/.DS_Store": b"\0", "__MACOSX/my-photos/._cat": b"\0"}))
    data = read_image_folder(path, limits=LIMITS, image_size=(32, 32), test_fraction=0.2, seed=3)
    assert data.class_names == list(CLASSES) and not data.split_given
    assert data.x.shape == (12, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    assert data.x.dtype == np.uint8 and data.y.dtype == np.int64
    assert np.bincount(data.y).tolist() == [4, 4, 4] and sorted(data.y_test.tolist()) == [0, 1, 2]
    # the class is in the pixels (class_image puts its colour on channel label % 3)
    for x, y in ((data.x, data.y), (data.x_test, data.y_test)):
        assert (x.reshape(len(x), 3, -1).mean(axis=2).argmax(axis=1) == y).all()
    again = read_image_folder(path, limits=LIMITS, image_size=(32, 32), test_fraction=0.2, seed=3)
    other = read_image_folder(path, limits=LIMITS, image_size=(32, 32), test_fraction=0.2, seed=4)
    assert np.array_equal(again.x_test, data.x_test) and np.array_equal(again.y, data.y)
    assert not np.array_equal(other.x_test, data.x_test)


def test_train_and_test_folders_keep_their_split_in_a_compressed_tar(tmp_path: Path) -> None:
    path = _write(tmp_path, tar_bytes(folder_entries(per_class=4, split=True), mode="w:gz"), "data.tar.gz")
    data = read_image_folder(path, limits=LIMITS, image_size=(24, 24), channels=1)
    assert data.split_given and data.class_names == list(CLASSES)
    assert data.x.shape == (12, 1, 24, 24) and data.x_test.shape == (6, 1, 24, 24)
    assert np.bincount(data.y).tolist() == [4, 4, 4] and np.bincount(data.y_test).tolist() == [2, 2, 2]


def test_resizing_covers_the_size_and_crops_the_centre(tmp_path: Path) -> None:
    """A 60×20 image whose middle third is white becomes all white at 20×20 (the sides are cropped);
    torchvision's Resize(20) + CenterCrop(20) does the same."""
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255
    tall = np.zeros((80, 40, 3), dtype=np.uint8)   # 40 wide, 80 high: scaled to 20×40, rows 20..60 kept
    tall[16:64] = 255                               # (a margin for the filter's reach over the crop's edge)
    path = _write(tmp_path, zip_bytes({"a/wide.png": png_bytes(wide), "b/tall.png": png_bytes(tall),
                                       "a/x.png": png_bytes(wide), "b/y.png": png_bytes(tall)}))
    data = read_image_folder(path, limits=LIMITS, image_size=(20, 20))
    images = np.concatenate([data.x, data.x_test])
    assert images.shape[1:] == (3, 20, 20)
    assert (images.min(axis=(1, 2, 3)) >= 250).all()    # both came out all white: only the centres are left


def test_without_a_size_images_keep_theirs_and_must_agree(tmp_path: Path) -> None:
    same = folder_entries(per_class=2, sizes=((12, 10),))
    data = read_image_folder(_write(tmp_path, zip_bytes(same)), limits=LIMITS)
    assert data.image_shape == [3, 10, 12]
    mixed = _write(tmp_path, zip_bytes(folder_entries(per_class=2)), "mixed.zip")
    with pytest.raises(ArchiveError, match="give image_size") as info:
        read_image_folder(mixed, limits=LIMITS)
    assert info.value.code == "archive_mixed_sizes"


def test_modes_convert_to_the_channels_asked_for(tmp_path: Path) -> None:
    """Grayscale, palette with transparency, RGBA and 16-bit grayscale all become RGB or L uint8."""
    from io import BytesIO

    from PIL import Image

    def encoded(image: Image.Image) -> bytes:
        buf = BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()

    gray16 = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))   # saved as 16-bit ("I;16")
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    entries = {"a/g16.png": encoded(gray16), "a/rgba.png": encoded(Image.new("RGBA", (10, 10), (255, 0, 0, 128))),
               "b/pal.png": encoded(palette), "b/l.png": encoded(Image.new("L", (10, 10), 128))}
    path = _write(tmp_path, zip_bytes(entries))
    rgb = read_image_folder(path, limits=LIMITS, test_fraction=0.5)
    images = {tuple(img[:, 0, 0].tolist()) for img in np.concatenate([rgb.x, rgb.x_test])}
    assert images == {(255, 255, 255), (255, 0, 0), (0, 255, 0), (128, 128, 128)}
    gray = read_image_folder(path, limits=LIMITS, channels=1, test_fraction=0.5)
    assert gray.image_shape == [1, 10, 10]
    assert 255 in {int(img[0, 0, 0]) for img in np.concatenate([gray.x, gray.x_test])}   # 16-bit white stays white


def test_stored_npz_loads_with_its_split_and_class_names(tmp_path: Path) -> None:
    data = read_image_folder(_write(tmp_path, zip_bytes(folder_entries(per_class=4, split=True))), limits=LIMITS,
                             image_size=(16, 16))
    data.save_npz(tmp_path / "stored.npz")
    loaded = load_npz(tmp_path / "stored.npz")
    assert loaded.class_names == list(CLASSES) and loaded.num_classes == 3
    assert np.array_equal(loaded.train_x.numpy(), data.x) and np.array_equal(loaded.test_y.numpy(), data.y_test)
    with np.load(tmp_path / "stored.npz", allow_pickle=False) as npz:   # plain arrays, no pickles
        assert npz["class_names"].dtype.kind == "U"


@pytest.mark.parametrize("name", list(bad_archives(LIMITS.max_uncompressed_bytes)))
def test_bad_archives_are_refused_with_their_code(tmp_path: Path, name: str) -> None:
    code, data = bad_archives(LIMITS.max_uncompressed_bytes)[name]
    path = _write(tmp_path, data, "bad.tar" if data[257:262] == b"ustar" else "bad.zip")
    with pytest.raises(ArchiveError) as info:
        read_image_folder(path, limits=LIMITS, image_size=(16, 16))
    assert info.value.code == code, info.value.message
    assert info.value.status == 422 and "bad" not in info.value.message   # names the member, not our temp file
    assert list(tmp_path.iterdir()) == [path]   # nothing extracted


def test_pixel_limit_is_a_setting_checked_before_decoding(tmp_path: Path) -> None:
    path = _write(tmp_path, zip_bytes(folder_entries(per_class=2, sizes=((40, 30),))))
    small = ImageFolderLimits(LIMITS.max_uncompressed_bytes, max_image_pixels=1000, max_dataset_bytes=10**8)
    with pytest.raises(ArchiveError, match=r"1200 pixels|40×30") as info:
        read_image_folder(path, limits=small, image_size=(16, 16))
    assert info.value.code == "archive_decompression_bomb"


def test_decoded_size_cap_and_bad_options(tmp_path: Path) -> None:
    path = _write(tmp_path, zip_bytes(folder_entries(per_class=2)))
    tight = ImageFolderLimits(LIMITS.max_uncompressed_bytes, LIMITS.max_image_pixels, max_dataset_bytes=6 * 3 * 64 * 64)
    with pytest.raises(ArchiveError, match="ROBUSTIFY_MAX_DATASET_BYTES") as info:
        read_image_folder(path, limits=tight, image_size=(65, 64))
    assert info.value.code == "archive_too_large"
    with pytest.raises(InvalidDataset, match="channels"):
        read_image_folder(path, limits=LIMITS, channels=2)
    with pytest.raises(InvalidDataset, match="at least 8"):
        read_image_folder(path, limits=LIMITS, image_size=(4, 4))
    with pytest.raises(ArchiveError) as info:
        read_image_folder(_write(tmp_path, b"plain text, not an archive", "x.zip"), limits=LIMITS)
    assert info.value.code == "archive_unreadable"


def test_test_classes_must_exist_in_train(tmp_path: Path) -> None:
    entries = folder_entries(per_class=2, split=True)
    entries["test/fox/0.png"] = png_bytes(np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(ArchiveError, match="fox") as info:
        read_image_folder(_write(tmp_path, zip_bytes(entries)), limits=LIMITS, image_size=(16, 16))
    assert info.value.code == "archive_layout"
    links = tar_bytes(folder_entries(per_class=2), links={"cat/up": (tarfile.SYMTYPE, "../../..")})
    with pytest.raises(ArchiveError) as info:
        read_image_folder(_write(tmp_path, links, "l.tar"), limits=LIMITS, image_size=(16, 16))
    assert info.value.code == "archive_link"
