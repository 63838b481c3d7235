"""A fine-tune's subsets are samples of every class, even from a data set stored class by class.

Issue 17: on an image-folder upload (stored class by class) `train_examples=400` trained on 2
classes of 10 and `test_examples=200` tested on 4. Here the real digits images are written as
PNGs into train/<class>/ and test/<class>/ folders, read by the image-folder reader, stored and
loaded as an upload is, and fine-tuned with both subsets below the split sizes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from core.engine.config import FinetuneConfig
from core.engine.data.datasets import load_npz
from core.engine.data.imagefolder import ImageFolderLimits, read_image_folder
from core.engine.recipes.finetune import finetune
from core.engine.zoo import create_model
from tests.archives import png_bytes, zip_bytes

PER_CLASS_TRAIN, PER_CLASS_TEST = 40, 20
TRAIN_EXAMPLES, TEST_EXAMPLES = 150, 60      # below the split sizes (400 and 200)


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """Digits as an image-folder upload: PNGs class by class, decoded and stored as the service does."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    entries: dict[str, bytes | None] = {}
    for label in range(10):
        members = np.flatnonzero(digits.target == label)[:PER_CLASS_TRAIN + PER_CLASS_TEST]
        for k, i in enumerate(members):
            split = "train" if k < PER_CLASS_TRAIN else "test"
            entries[f"{split}/{label}/{k:03d}.png"] = png_bytes(images[i])
    root = tmp_path_factory.mktemp("folder")
    archive = root / "digits.zip"
    archive.write_bytes(zip_bytes(entries))
    limits = ImageFolderLimits(max_uncompressed_bytes=10**7, max_image_pixels=10**6, max_dataset_bytes=10**8)
    decoded = read_image_folder(archive, limits=limits, channels=1)
    decoded.save_npz(root / "digits.npz")
    return load_npz(root / "digits.npz")


def test_a_class_sorted_folder_is_fine_tuned_and_tested_on_every_class(folder_data) -> None:
    data = folder_data
    assert data.train_x.shape[0] == 10 * PER_CLASS_TRAIN and data.test_x.shape[0] == 10 * PER_CLASS_TEST
    # stored class by class: the first N images would be a few classes only
    assert len(np.unique(data.train_y[:TRAIN_EXAMPLES].numpy())) <= 4
    assert len(np.unique(data.test_y[:TEST_EXAMPLES].numpy())) <= 3

    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": 0.1}, epochs=1, batch_size=16, lr=0.01,
                            attack_steps=1, train_examples=TRAIN_EXAMPLES, test_examples=TEST_EXAMPLES,
                            eval_wpgd_steps=2, eval_pgd_steps=1, test_wpgd_steps=3, test_pgd_steps=2,
                            budget_subset=32, evaluation="quick", seed=3)
    result = finetune(config, model, data, device="cpu")

    samples = result.provenance["samples"]
    assert samples["train"]["n"] == TRAIN_EXAMPLES and samples["test"]["n"] == TEST_EXAMPLES
    for split in ("train", "fit", "validation", "test"):
        counts = samples[split]["per_class"]
        assert len(counts) == 10 and min(counts) >= 1, (split, counts)
        assert samples[split]["classes_missing"] == []
        assert samples[split]["method"] == "stratified random sample" and samples[split]["seed"] == 3
    # proportional: equal classes give equal shares (within one image)
    assert max(samples["test"]["per_class"]) - min(samples["test"]["per_class"]) <= 1
    assert max(samples["train"]["per_class"]) - min(samples["train"]["per_class"]) <= 1
    assert sum(samples["fit"]["per_class"]) == result.provenance["examples"]["train"]
    assert result.provenance["validation_split"]["per_class"]["validation"] == samples["validation"]["per_class"]
    # the reported numbers are on those test images, class by class
    assert result.before["n_examples"] == TEST_EXAMPLES
    assert [row["n"] for row in result.before["per_class"]] == samples["test"]["per_class"]
    assert np.array(result.before["confusion_matrix"]).sum() == TEST_EXAMPLES


def test_the_same_seed_draws_the_same_subsets(folder_data) -> None:
    def drawn(seed: int) -> dict:
        torch.manual_seed(0)
        model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
        config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": 0.1}, epochs=1, batch_size=16,
                                lr=1e-9, attack_steps=1, train_examples=TRAIN_EXAMPLES, test_examples=TEST_EXAMPLES,
                                eval_wpgd_steps=1, eval_pgd_steps=1, test_wpgd_steps=1, test_pgd_steps=1,
                                budget_subset=16, evaluation="quick", seed=seed)
        samples = finetune(config, model, folder_data, device="cpu").provenance["samples"]
        return {split: samples[split]["indices_sha256"] for split in samples}

    first = drawn(5)
    assert drawn(5) == first
    assert drawn(6)["test"] != first["test"]
