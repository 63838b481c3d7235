"""Data set cards: where each built-in data set comes from, how robustify splits it, its classes,
counts per split and image shape (plain Python, so the API answers them without torch).

GET /v1/datasets/<name> answers a built-in data set's card, and docs/datasets.md says the same
in words; tests/core/test_dataset_cards.py checks the counts against the loaders
(core/engine/data/datasets.py) and runs each card's `reproduce` code.

The split matters to anyone who trains a model elsewhere and then fine-tunes or evaluates it
here: digits has no published test split, so robustify makes its own (stratified, seed 0), and a
model trained on scikit-learn's `train_test_split` of the same 1,797 images has seen some of
robustify's test images. Each card's `reproduce` snippet gives the exact train and test split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from core.engine.data.census import BUILTIN_CLASS_COUNTS

# The split of digits: core.engine.data.npz.stratified_split with these arguments.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SEED = 0

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# CIFAR-100's 100 fine labels in label order (the `fine_label_names` of its meta file: alphabetical).
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]

# The digits split in plain numpy and scikit-learn: the same indices as the service's loader
# (core.engine.data.datasets.load_digits), so a model trained on x_train never saw x_test.
DIGITS_REPRODUCE = f"""\
import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
x = np.round(digits.images * (255 / 16)).astype(np.uint8)   # (1797, 8, 8): 0..16 scaled to 0..255
y = digits.target
rng = np.random.default_rng({DIGITS_SEED})
train, test = [], []
for label in np.unique(y):                 # each class in turn, {DIGITS_TEST_FRACTION:.0%} of it held out
    members = rng.permutation(np.flatnonzero(y == label))
    n_test = min(max(round(len(members) * {DIGITS_TEST_FRACTION}), 1), len(members) - 1)
    test.append(members[:n_test])
    train.append(members[n_test:])
train_idx = rng.permutation(np.concatenate(train))
test_idx = rng.permutation(np.concatenate(test))
x_train, y_train = x[train_idx], y[train_idx]   # train your model on these only
x_test, y_test = x[test_idx], y[test_idx]       # robustify's test split: never train on it
"""

FASHION_MNIST_REPRODUCE = """\
from torchvision.datasets import FashionMNIST

train = FashionMNIST("data", train=True, download=True)    # train-images/labels-idx*-ubyte: 60,000
test = FashionMNIST("data", train=False, download=True)    # t10k-images/labels-idx*-ubyte: 10,000
x_train, y_train = train.data.numpy(), train.targets.numpy()   # uint8 (60000, 28, 28)
x_test, y_test = test.data.numpy(), test.targets.numpy()       # robustify's test split: never train on it
"""


def _cifar_reproduce(cls: str, count_note: str) -> str:
    return f"""\
from torchvision.datasets import {cls}

train = {cls}("data", train=True, download=True)    # {count_note}
test = {cls}("data", train=False, download=True)    # the test file: 10,000
x_train, y_train = train.data, train.targets        # uint8 (50000, 32, 32, 3) (N, H, W, C), RGB
x_test, y_test = test.data, test.targets            # robustify's test split: never train on it
"""


SplitRule = Literal["published", "stratified"]


@dataclass(frozen=True)
class DatasetCard:
    name: str
    title: str
    source: str                     # where the images come from, in words
    url: str
    license: str
    image_shape: list[int]          # [C, H, W] as a job sees them
    pixels: str                     # how the stored uint8 pixels relate to the source's values
    class_names: list[str]
    split_rule: SplitRule           # published: the source's own train/test files; stratified: robustify's split
    split: str                      # the rule in words
    reproduce: str                  # Python that gives the same train and test images
    counts_from: Literal["loader", "source"]   # recounted from the loader by the tests, or stated by the source
    test_fraction: float | None = None
    seed: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def class_counts(self) -> dict[str, list[int]]:
        return BUILTIN_CLASS_COUNTS[self.name]

    def as_dict(self) -> dict[str, Any]:
        """The card as GET /v1/datasets/<name> answers it (api/responses.py DatasetCard)."""
        return {
            "title": self.title, "source": self.source, "url": self.url, "license": self.license,
            "pixels": self.pixels,
            "split": {"rule": self.split_rule, "description": self.split, "test_fraction": self.test_fraction,
                      "seed": self.seed},
            "counts_from": self.counts_from, "reproduce": self.reproduce, "notes": list(self.notes),
        }


_PUBLISHED = ("the source's own split, used as published: robustify neither reshuffles nor holds out images; "
              "the fine-tune's validation images come from the train split")

def _cifar_card(name: str, title: str, folder: str, classes: list[str], files: str, train_note: str,
                extra: str = "") -> DatasetCard:
    """CIFAR-10 and CIFAR-100: the same source, pixels and kind of split."""
    return DatasetCard(
        name=name, title=title,
        source=f"Krizhevsky, \"Learning Multiple Layers of Features from Tiny Images\" (2009): the python version "
               f"({folder}) in the worker's data directory, downloaded from the source when allowed{extra}",
        url="https://www.cs.toronto.edu/~kriz/cifar.html",
        license="no licence stated by the source; cite the technical report",
        image_shape=[3, 32, 32],
        pixels="RGB uint8 0..255 as stored in the batches; the engine feeds pixel / 255",
        class_names=classes, split_rule="published", split=f"{_PUBLISHED}: {files}",
        reproduce=_cifar_reproduce(name.upper(), train_note), counts_from="source",
    )


CARDS: dict[str, DatasetCard] = {card.name: card for card in (
    DatasetCard(
        name="digits", title="scikit-learn digits (8×8 handwritten digits)",
        source="scikit-learn's bundled load_digits: a copy of the test part of the UCI \"Optical Recognition of "
               "Handwritten Digits\" data set (1,797 images); no download",
        url="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        license="CC BY 4.0 (UCI Machine Learning Repository)",
        image_shape=[1, 8, 8],
        pixels="grayscale; scikit-learn's values 0..16 scaled to uint8 0..255 as round(v × 255 / 16); the engine "
               "feeds the network pixel / 255 in [0, 1]",
        class_names=[str(d) for d in range(10)],
        split_rule="stratified", test_fraction=DIGITS_TEST_FRACTION, seed=DIGITS_SEED,
        split=f"robustify's own split (the data has no published one): within each class, "
              f"{DIGITS_TEST_FRACTION:.0%} of the images (rounded, at least one) are held out as the test split, "
              f"drawn with numpy's default_rng({DIGITS_SEED}) (core.engine.data.npz.stratified_split); it is not "
              "scikit-learn's train_test_split, whose split differs: a model trained on a train_test_split of "
              "the 1,797 images has seen some of robustify's test images",
        reproduce=DIGITS_REPRODUCE, counts_from="loader",
        notes=["Train the model you upload on x_train of the reproduce code only, or its test numbers here are "
               "measured partly on images it learnt."],
    ),
    DatasetCard(
        name="fashion-mnist", title="Fashion-MNIST (Zalando article images)",
        source="Zalando Research's Fashion-MNIST IDX files: Debian's dataset-fashion-mnist package "
               "(/usr/share/datasets/fashion-mnist), the worker's data directory, or torchvision's mirrors when "
               "downloads are allowed",
        url="https://github.com/zalandoresearch/fashion-mnist",
        license="MIT",
        image_shape=[1, 28, 28],
        pixels="grayscale uint8 0..255 as stored in the IDX files; the engine feeds pixel / 255",
        class_names=FASHION_MNIST_CLASSES,
        split_rule="published",
        split=f"{_PUBLISHED}: train-*-idx*-ubyte (60,000) and t10k-*-idx*-ubyte (10,000)",
        reproduce=FASHION_MNIST_REPRODUCE, counts_from="loader",
    ),
    _cifar_card("cifar10", "CIFAR-10", "cifar-10-batches-py", CIFAR10_CLASSES,
                "data_batch_1 to data_batch_5 (50,000) and test_batch (10,000)", "data_batch_1..5: 50,000"),
    _cifar_card("cifar100", "CIFAR-100 (fine labels)", "cifar-100-python", CIFAR100_CLASSES,
                "train (50,000) and test (10,000)", "the train file: 50,000",
                extra="; the 100 fine labels (the 20 coarse ones are not used)"),
)}
