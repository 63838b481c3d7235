"""The measurement cache (core.engine.cache): a second fine-tune of the same model on the same test
sample reads the input model's before-measurement, the corrupted test images and the input model's
corruption outcomes back instead of measuring them, and its numbers are those of a run without a
cache, bit for bit. Anything the numbers depend on changes the key; an unreadable entry is measured
afresh and written again."""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch

from core.engine.cache import MemoryCache, unpack
from core.engine.config import FinetuneConfig
from core.engine.recipes.finetune import FinetuneResult, finetune

CORRUPTIONS = {"types": ["gaussian_noise", "contrast"], "severities": [1, 5]}


def _config(**overrides: Any) -> FinetuneConfig:
    fields: dict[str, Any] = dict(
        threat_model={"kind": "w2-linf", "delta": 0.1}, epochs=1, batch_size=64, lr=0.003, beta=1.0, attack_steps=2,
        train_examples=500, validation_examples=60, eval_wpgd_steps=3, eval_pgd_steps=2, test_wpgd_steps=4,
        test_pgd_steps=2, test_examples=60, evaluation="quick", seed=0, corruptions=CORRUPTIONS)
    fields.update(overrides)
    return FinetuneConfig(**fields)


@pytest.fixture(scope="module")
def run(digits_small_cnn):
    model, data = digits_small_cnn

    def go(cache: MemoryCache | None = None, **overrides: Any) -> FinetuneResult:
        torch.manual_seed(0)
        return finetune(_config(**overrides), copy.deepcopy(model), data, device="cpu", cache=cache)
    return go


@pytest.fixture(scope="module")
def plain(run) -> FinetuneResult:
    """The run without a cache: what every cached run must reproduce."""
    return run()


@pytest.fixture(scope="module")
def first(run) -> tuple[MemoryCache, FinetuneResult, dict[str, bytes]]:
    """A first run with an empty cache: it measures everything and stores it (the entries it wrote)."""
    cache = MemoryCache()
    result = run(cache)
    return cache, result, dict(cache.entries)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def test_a_second_run_reads_the_input_models_measurement_back(run, plain, first) -> None:
    cache, measured, _ = first
    assert cache.hits == 0 and len(cache.entries) == 3      # before, corrupted images, input corruptions
    reused = measured.provenance["reused"]
    assert (reused["before"], reused["corrupted_images"], reused["input_corruptions"]) == (False, False, False)
    assert set(reused["keys"]) == {"before", "corrupted_images", "input_corruptions"}
    assert "reused" not in plain.provenance                 # no cache: the provenance as before

    second = run(cache)
    assert cache.hits == 3
    again = second.provenance["reused"]
    assert (again["before"], again["corrupted_images"], again["input_corruptions"]) == (True, True, True)
    assert again["keys"] == reused["keys"]
    # the numbers are a fresh run's, exactly: the before (with its corruption block), the after, the paired changes
    assert second.before == measured.before == plain.before
    assert _json(second.before) == _json(plain.before)
    assert second.after == plain.after and second.best_epoch == plain.best_epoch > 0
    assert second.change_ci95 == plain.change_ci95 and second.verdict == plain.verdict
    assert second.after["corruptions"]["versus_input"] == plain.after["corruptions"]["versus_input"]
    assert second.warnings == plain.warnings

    # whatever the numbers depend on changes the key: nothing is read back
    for change in ({"seed": 1}, {"threat_model": {"kind": "w2-linf", "delta": 0.05}}, {"test_examples": 50}):
        hits = cache.hits
        other = run(cache, **change).provenance["reused"]
        assert other["before"] is False, change
        assert other["keys"]["before"] != reused["keys"]["before"], change
        if "threat_model" in change:      # the corrupted images and the input's outcomes do not depend on δ
            assert other["corrupted_images"] and other["input_corruptions"] and cache.hits == hits + 2
        else:
            assert not other["corrupted_images"] and cache.hits == hits, change


def test_an_unreadable_entry_is_measured_afresh_and_written_again(run, plain, first) -> None:
    cache, good = MemoryCache(), first[2]
    for k, v in good.items():
        cache.entries[k] = v[: len(v) // 2]          # truncated: no longer an entry
    broken = run(cache)
    reused = broken.provenance["reused"]
    assert (reused["before"], reused["corrupted_images"], reused["input_corruptions"]) == (False, False, False)
    assert broken.before == plain.before and broken.change_ci95 == plain.change_ci95
    assert cache.entries == good                      # written again, whole


def test_the_input_model_handed_back_and_images_over_the_bound(run) -> None:
    """No epoch beats the input (β = 3 here): the returned model is the input model, whose numbers,
    audit and corruption outcomes all come from the cache; corrupted images over the cache's
    bound are not kept (60 images × 64 px × 4 cells = 15,360 bytes)."""
    cache = MemoryCache(max_entry_bytes=10_000)
    first = run(cache, beta=3.0)
    assert first.best_epoch == 0 and {unpack(v)[1]["entry"] for v in cache.entries.values()} == {
        "before", "corruption_result"}
    second = run(cache, beta=3.0)
    reused = second.provenance["reused"]
    assert (reused["before"], reused["corrupted_images"], reused["input_corruptions"]) == (True, False, True)
    assert second.before == second.after == first.before and second.audit == first.audit
    assert second.verdict == first.verdict and second.warnings == first.warnings
