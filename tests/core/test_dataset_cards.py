"""The built-in data sets' cards (core/engine/data/cards.py), as GET /v1/datasets/<name> answers
them and docs/datasets.md prints them: the counts are those the loaders produce, each card's
reproduce code rebuilds the exact split, and the digits split is not scikit-learn's."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.model_selection import train_test_split

from api.schemas import BUILTIN_DATASETS as API_SHAPES
from core.engine.data.cards import CARDS
from core.engine.data.datasets import BUILTIN_DATASETS, ImageData, load_digits, load_fashion_mnist
from core.engine.data.sampling import class_counts

ROOT = Path(__file__).resolve().parents[2]


def _counts(data: ImageData) -> dict[str, list[int]]:
    return {"train": class_counts(data.train_y.numpy(), data.num_classes),
            "test": class_counts(data.test_y.numpy(), data.num_classes)}


@pytest.fixture(scope="module")
def api_cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """GET /v1/datasets/<name> of every built-in, from the app on the embedded default (SQLite)."""
    import migrations
    from api.app import create_app
    from core.service.settings import Settings

    settings = Settings(data_dir=tmp_path_factory.mktemp("cards"), auth="off")
    migrations.upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        answers = {name: client.get(f"/v1/datasets/{name}") for name in BUILTIN_DATASETS}
        listed = client.get("/v1/datasets")
    assert all(r.status_code == 200 for r in answers.values()), {n: r.text for n, r in answers.items()}
    assert listed.status_code == 200 and listed.json()["data"] == []   # the list stays the uploads only
    return {name: r.json() for name, r in answers.items()}


def test_every_builtin_has_a_consistent_card(api_cards: dict[str, dict[str, Any]]) -> None:
    assert sorted(CARDS) == sorted(BUILTIN_DATASETS) == sorted(API_SHAPES)
    for name, card in CARDS.items():
        answer = api_cards[name]
        counts = card.class_counts
        assert card.image_shape == API_SHAPES[name] == answer["image_shape"], name
        assert len(card.class_names) == len(set(card.class_names)) == len(counts["train"]) == len(counts["test"])
        assert answer["class_names"] == card.class_names and answer["num_classes"] == len(card.class_names)
        assert answer["class_counts"] == counts and answer["warnings"] == []
        assert answer["splits"] == {"train": sum(counts["train"]), "test": sum(counts["test"])}
        assert answer["card"]["split"]["rule"] == card.split_rule and answer["card"]["reproduce"] == card.reproduce
        assert answer["card"]["url"].startswith("https://") and answer["card"]["license"]
        # a published split has no seed of ours; robustify's own split states both
        stratified = card.split_rule == "stratified"
        assert (card.seed is not None and card.test_fraction is not None) == stratified, name


def test_the_counts_are_those_of_the_loaders(api_cards: dict[str, dict[str, Any]]) -> None:
    digits = load_digits()
    assert CARDS["digits"].counts_from == "loader"
    assert api_cards["digits"]["class_counts"] == _counts(digits) and list(digits.image_shape) == [1, 8, 8]
    assert api_cards["digits"]["num_examples"] == 1797
    fashion = load_fashion_mnist(data_dir="/nonexistent")   # Debian's dataset-fashion-mnist
    assert CARDS["fashion-mnist"].counts_from == "loader"
    assert api_cards["fashion-mnist"]["class_counts"] == _counts(fashion)
    assert list(fashion.image_shape) == CARDS["fashion-mnist"].image_shape
    # CIFAR is not on the test machines: its counts are the source's (5,000 / 1,000 and 500 / 100 a class)
    for name, per_class in (("cifar10", (5000, 1000)), ("cifar100", (500, 100))):
        card = CARDS[name]
        assert card.counts_from == "source" and len(card.class_names) == len(card.class_counts["train"])
        assert {split: set(v) for split, v in card.class_counts.items()} == {"train": {per_class[0]},
                                                                           "test": {per_class[1]}}
        assert sum(card.class_counts["train"]) == 50_000 and sum(card.class_counts["test"]) == 10_000
    assert CARDS["cifar100"].class_names == sorted(CARDS["cifar100"].class_names)   # the meta file's order


def _run_digits_reproduce() -> dict[str, Any]:
    scope: dict[str, Any] = {}
    exec(compile(CARDS["digits"].reproduce, "digits-card", "exec"), scope)   # the card's own code, as printed
    return scope


def test_the_digits_reproduce_code_gives_the_services_split() -> None:
    scope = _run_digits_reproduce()
    data = load_digits()
    assert np.array_equal(scope["x_train"][:, None], data.train_x.numpy())
    assert np.array_equal(scope["y_train"], data.train_y.numpy())
    assert np.array_equal(scope["x_test"][:, None], data.test_x.numpy())
    assert np.array_equal(scope["y_test"], data.test_y.numpy())
    assert not set(scope["train_idx"]) & set(scope["test_idx"])
    assert len(scope["train_idx"]) + len(scope["test_idx"]) == 1797


def test_sklearn_train_test_split_overlaps_the_services_test_split() -> None:
    # what the card warns about: the usual scikit-learn split, even stratified and seeded 0, is another split
    ours = set(_run_digits_reproduce()["test_idx"].tolist())
    y = sklearn_digits().target
    theirs_train, _ = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    seen = ours & set(theirs_train.tolist())
    assert len(seen) > 0.5 * len(ours), f"only {len(seen)} of our {len(ours)} test images in sklearn's train part"


def test_the_docs_page_prints_each_card() -> None:
    page = (ROOT / "docs" / "datasets.md").read_text()
    for name, card in CARDS.items():
        assert f"`{name}`" in page, name
        assert card.reproduce in page, f"docs/datasets.md must print the {name} card's reproduce code verbatim"
        assert card.url in page, name
        for split, per_class in card.class_counts.items():
            row = f"| {split} | " + " | ".join(f"{n:,}" for n in per_class) + " |"
            if len(per_class) <= 10:
                assert row in page, f"{name}: {row}"
            else:
                assert f"{per_class[0]:,} images in every class" in page, name
    for linked_from in ("mkdocs.yml", "docs/index.md", "docs/getting-started.md"):
        assert "datasets.md" in (ROOT / linked_from).read_text(), linked_from
