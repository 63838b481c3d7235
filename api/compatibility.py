"""Does a model fit a data set? Checked when a job is submitted, before anything is stored.

A job whose model cannot read the data set's images (channels, image size) or whose labels
go beyond the model's classes would only fail later in a worker with a raw framework error;
here it is a 422 `incompatible_dataset` naming both shapes. Torch-free: the facts come from
the model row and the data set's row (or the built-in table).
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.crud import find_owned_dataset
from api.deps import Caller
from api.errors import ApiError, not_found
from api.schemas import BUILTIN_DATASETS
from core.errors import ErrorCode
from core.service.db import Model

# The images a model row takes when it records no input shape (what the worker assumes too).
DEFAULT_INPUT_SHAPE = [3, 32, 32]
# Share of an uploaded .npz that core.engine.data.datasets.load_npz holds out as its test split.
UPLOAD_TEST_FRACTION = 0.2

# name -> (number of classes, training images) of the built-in data sets; the image shapes are
# api.schemas.BUILTIN_DATASETS. digits: scikit-learn's 1,797 images less core.engine.data.datasets's test split.
BUILTIN_CLASSES_AND_TRAIN: dict[str, tuple[int, int]] = {
    "digits": (10, 1438), "fashion-mnist": (10, 60000), "cifar10": (10, 50000), "cifar100": (100, 50000),
}


@dataclass(frozen=True)
class DatasetFacts:
    """What a job needs to know about its data set at submit time."""

    name: str
    image_shape: list[int]      # [C, H, W]
    num_classes: int            # labels are 0 .. num_classes - 1
    train_examples: int         # images in its training split


def dataset_facts(session: Session, who: Caller, dataset: str) -> DatasetFacts:
    """The facts of a built-in data set or of one of the caller's uploads; 404/422 otherwise."""
    if dataset in BUILTIN_DATASETS:
        classes, train = BUILTIN_CLASSES_AND_TRAIN[dataset]
        return DatasetFacts(dataset, list(BUILTIN_DATASETS[dataset]), classes, train)
    if dataset.startswith("ds_"):
        row = find_owned_dataset(session, who, dataset)
        if row is None:
            raise not_found("dataset", dataset)
        splits = row.splits or {}  # an image-folder upload records its own train/test split
        train = int(splits["train"]) if "train" in splits else (
            row.num_examples - round(UPLOAD_TEST_FRACTION * row.num_examples))
        return DatasetFacts(row.id, [int(s) for s in row.image_shape], int(row.num_classes), max(1, train))
    raise ApiError(422, ErrorCode.DATASET_UNAVAILABLE,
                   f"unknown dataset {dataset!r}: use one of {', '.join(BUILTIN_DATASETS)} or the id of an "
                   "uploaded data set (POST /v1/datasets).")


def check_compatible(model: Model, data: DatasetFacts) -> None:
    """422 `incompatible_dataset` unless the model takes the data set's images and labels."""
    shape = [int(s) for s in (model.input_shape or DEFAULT_INPUT_SHAPE)]
    problems = []
    if shape[0] != data.image_shape[0]:
        problems.append(f"the model reads {shape[0]} channel(s), the images have {data.image_shape[0]}")
    if shape[1:] != data.image_shape[1:]:
        problems.append(f"the model takes {shape[1]}×{shape[2]} images, the data set's are "
                        f"{data.image_shape[1]}×{data.image_shape[2]}")
    if data.num_classes > model.num_classes:
        problems.append(f"the data set has labels 0..{data.num_classes - 1} but the model outputs "
                        f"{model.num_classes} classes")
    if problems:
        raise ApiError(
            422, ErrorCode.INCOMPATIBLE_DATASET,
            f"model {model.id} (input {shape}, {model.num_classes} classes) does not fit data set {data.name} "
            f"(images {data.image_shape}, {data.num_classes} classes): {'; '.join(problems)}. Use a data set "
            "with the model's input shape and classes, or register a model made for this data set.",
            model_id=model.id, model_input_shape=shape, model_num_classes=model.num_classes,
            dataset=data.name, dataset_image_shape=data.image_shape, dataset_num_classes=data.num_classes)
