"""Upload a folder of images, one sub-folder per class, as a data set.

    python examples/upload_image_folder.py --folder photos/          # photos/<class>/<image>
    python examples/upload_image_folder.py                           # makes digits-png/ from digits first

The folder is zipped and uploaded; the server decodes the images (PNG, JPEG, ...), names the labels
after the sorted class folders and, for a folder without train/ and test/, holds out a stratified
share of every class as the test split (`test_fraction`, `seed`). The answer's id (ds_…) is the
`dataset` of models and jobs. Needs the SDK and Pillow (and scikit-learn for the digits). Server:
ROBUSTIFY_URL / ROBUSTIFY_API_KEY, or --url / --api-key.
"""
from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from robustify import Client

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_digits_folder(folder: Path, per_class: int | None) -> None:
    """scikit-learn's digits as 8×8 grayscale PNGs in <folder>/<class name>/."""
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)   # 0..16 -> 0..255
    for label, name in enumerate(NAMES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits.target == label)[:per_class]:
            Image.fromarray(pixels[i]).save(folder / name / f"{i:04d}.png")


def zip_folder(folder: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())   # <class>/<image> at the top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, help="class folders to upload (default: make digits-png/)")
    parser.add_argument("--image-size", help="resize and centre-crop every image: 224, or 224,160 (height,width)")
    parser.add_argument("--channels", type=int, default=None, help="3 (RGB, the server's default) or 1 (grayscale)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--url")
    parser.add_argument("--api-key")
    parser.add_argument("--quick", action="store_true", help="12 images per class: for smoke tests")
    args = parser.parse_args()

    folder, channels = args.folder, args.channels
    if folder is None:
        folder, channels = Path("digits-png"), channels or 1
        make_digits_folder(folder, 12 if args.quick else None)
    archive = folder.with_suffix(".zip")
    zip_folder(folder, archive)
    size: int | tuple[int, int] | None = None
    if args.image_size:
        sides = [int(v) for v in args.image_size.split(",")]
        size = (sides[0], sides[1]) if len(sides) == 2 else sides[0]
    with Client(args.url, api_key=args.api_key) as client:
        dataset = client.datasets.upload(archive, name=folder.name, channels=channels, image_size=size,
                                         test_fraction=args.test_fraction)
    print(f"dataset {dataset.id}: {len(dataset.class_names or [])} classes {dataset.class_names}")
    print(f"  images {dataset.image_shape}, per class {dataset.class_counts}")
    for warning in dataset.warnings:
        print(f"  warning: {warning.message}")


if __name__ == "__main__":
    main()
