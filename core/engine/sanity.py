"""The registration's sanity check: does the model classify its own data set at all?

A wrong input contract looks exactly like a robustness problem once a job runs, so a model is
checked when it is registered: its clean accuracy on a seeded, stratified sample of the
registered data set's test split (SAMPLE_SIZE images, seed SAMPLE_SEED), with a 95 % Wilson
interval. The same images also go through a few cheap variants, each testing one usual cause:

- normalisation: ImageNet's mean/std (3 channels), the sample's own mean/std, none (mean 0, std 1);
- channel order: the channels reversed (RGB <-> BGR; 3 channels);
- pixel range: pixels in 0..255 instead of 0..1 (through the registered normalisation).

Each variant runs first on the sample's first SCREEN_SIZE images (the sample is in random order,
so they are a random sample too); one that gets more of them right than the registered model
runs on the whole sample. A variant *fixes it* when, on the whole
sample, its interval lies wholly above the registered model's and its accuracy is not near chance.

The check warns (the model stays ready) when the registered accuracy is *near chance*: its
interval reaches down to chance level 1/K, or even its upper bound stays below
min(2/K, 1/K + 0.25) (K classes: below 0.2 for 10 classes, 0.75 for 2); or when a variant fixes
it. The best variant that fixes it names the likely cause; with none, a head of another size than
the data set's classes names num_classes. The result is a plain dictionary, stored with the
model and shown by the API.

Importing this module loads no torch (the API reads SANITY_CHECK_KEY from it).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.engine.input_contract import DATASET_STATS, is_identity

if TYPE_CHECKING:
    import torch
    from torch import nn

    from core.engine.data.datasets import ImageData

__all__ = ["SAMPLE_SEED", "SAMPLE_SIZE", "SANITY_CHECK_KEY", "near_chance", "sanity_check", "skipped_check"]

# Where a model row keeps its check (Model.meta, the row's JSON; the API leaves it out of `metadata`).
SANITY_CHECK_KEY = "robustify_sanity_check"
SAMPLE_SIZE = 256
SAMPLE_SEED = 0
SCREEN_SIZE = 64
BATCH_SIZE = 128

# cause -> how the message names it
CAUSES = {
    "normalisation": "the registered normalisation (input_mean / input_std) is probably wrong",
    "channel_order": "the model probably expects the other channel order (BGR instead of RGB, or the reverse)",
    "pixel_range": "the model probably expects pixels in 0..255, not 0..1",
    "num_classes": "num_classes or the class order is probably wrong",
}
USUAL_CAUSES = ("the usual causes are a wrong normalisation (input_mean / input_std), the channel order (BGR vs "
                "RGB), the pixel range (0..255 vs 0..1), a wrong num_classes or class order, or weights that "
                "were not trained on this data set")


def chance_level(num_classes: int) -> float:
    return 1.0 / max(num_classes, 1)


def near_chance(correct: int, n: int, num_classes: int) -> bool:
    """The module's rule: the 95 % interval reaches down to chance 1/K, or stays below min(2/K, 1/K + 0.25)."""
    from core.engine.evaluation.intervals import wilson_interval

    chance = chance_level(num_classes)
    lo, hi = wilson_interval(correct, n)
    return lo <= chance or hi < min(2 * chance, chance + 0.25)


def skipped_check(dataset: str, reason: str) -> dict[str, Any]:
    """The record of a check that did not run, and why."""
    return {"status": "skipped", "dataset": dataset, "split": "test", "accuracy": None, "correct": None,
            "n": None, "ci95": None, "chance": None, "near_chance": None, "seed": SAMPLE_SEED, "likely_cause": None,
            "variants": [], "message": f"The accuracy check was skipped: {reason}", "seconds": 0.0}


def _fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def sanity_check(model: nn.Module, data: ImageData, *, num_classes: int, input_shape: Sequence[int],
                 input_mean: Sequence[float] | None, input_std: Sequence[float] | None,
                 sample_size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> dict[str, Any]:
    """Check `model` (taking [0, 1] pixels, normalising with input_mean/input_std inside) on a
    sample of `data`'s test split; the module's docstring says what is measured and reported."""
    import torch

    from core.engine.architectures._layers import PixelInputModel
    from core.engine.data.datasets import to_unit_float
    from core.engine.data.sampling import stratified_indices

    started = time.monotonic()
    name = data.name
    if list(data.image_shape) != list(input_shape):
        return skipped_check(name, f"the data set's images are {'×'.join(map(str, data.image_shape))} but the model "
                                   f"takes {'×'.join(map(str, input_shape))}.")
    if data.test_y.numel() == 0:
        return skipped_check(name, "the data set has no test images.")
    idx = stratified_indices(data.test_y.numpy(), sample_size, seed)
    x = to_unit_float(data.test_x[torch.from_numpy(idx)], "cpu")
    y = data.test_y[torch.from_numpy(idx)]
    net = model.net if isinstance(model, PixelInputModel) else model
    mean = list(input_mean) if input_mean is not None else [0.0] * x.shape[1]
    std = list(input_std) if input_std is not None else [1.0] * x.shape[1]

    predicted = _predict(model, x)
    correct = int((predicted == y).sum())
    n = int(y.numel())
    result = _stat(correct, n)
    screen = min(SCREEN_SIZE, n)
    screen_hits = int((predicted[:screen] == y[:screen]).sum())
    variants: list[dict[str, Any]] = []
    for variant, description, cause, run in _variants(model, net, x, mean, std):
        stat = _stat(int((_predict(run, x[:screen]) == y[:screen]).sum()), screen)
        if screen < n and stat["correct"] > screen_hits:  # promising: measured on the whole sample
            stat = _stat(int((_predict(run, x) == y).sum()), n)
        fixes = (stat["n"] == n and stat["ci95"][0] > result["ci95"][1]
                 and not near_chance(stat["correct"], n, num_classes))
        variants.append({"name": variant, "description": description, "cause": cause, **stat, "fixes": fixes})
    fixing = sorted((v for v in variants if v["fixes"]), key=lambda v: -v["accuracy"])
    chance_only = near_chance(correct, n, num_classes)
    warn = chance_only or bool(fixing)
    likely = fixing[0]["cause"] if fixing else ("num_classes" if warn and data.num_classes != num_classes else None)
    record = {"status": "warning" if warn else "passed", "dataset": name, "split": "test", **result,
              "chance": chance_level(num_classes), "near_chance": chance_only, "seed": seed, "likely_cause": likely,
              "variants": variants}
    share, label = _top_prediction(predicted, num_classes)
    record["message"] = _message(record, fixing, num_classes, data.num_classes, share, label)
    record["seconds"] = round(time.monotonic() - started, 3)
    return record


def _stat(correct: int, n: int) -> dict[str, Any]:
    from core.engine.evaluation.intervals import wilson_interval

    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n, "correct": correct, "n": n, "ci95": [lo, hi]}


def _predict(model: Any, x: torch.Tensor) -> torch.Tensor:
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + BATCH_SIZE]).argmax(1) for i in range(0, len(x), BATCH_SIZE)])


class _InputChange:
    """The registered model fed a changed input (channels reversed, pixels scaled)."""

    def __init__(self, model: nn.Module, change: Any) -> None:
        self.model, self.change = model, change

    def eval(self) -> _InputChange:
        self.model.eval()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(self.change(x))
        return out


def _variants(model: nn.Module, net: nn.Module, x: torch.Tensor, mean: list[float], std: list[float]
              ) -> list[tuple[str, str, str, Any]]:
    """(name, description, cause, model) of each cheap variant that differs from the registration."""
    from core.engine.architectures._layers import with_pixel_input

    channels = int(x.shape[1])
    out: list[tuple[str, str, str, Any]] = []
    stats: list[tuple[str, str, list[float], list[float]]] = []
    imagenet = DATASET_STATS["imagenet"]
    if channels == 3:
        stats.append(("imagenet_normalisation", "with ImageNet's mean/std", list(imagenet[0]), list(imagenet[1])))
    flat = x.transpose(0, 1).reshape(channels, -1)
    sample_mean = [round(float(v), 3) for v in flat.mean(1)]
    sample_std = [max(round(float(v), 3), 1e-3) for v in flat.std(1)]
    stats.append(("dataset_normalisation", f"with the data set's own mean/std ({_fmt(sample_mean)} / "
                                           f"{_fmt(sample_std)})", sample_mean, sample_std))
    stats.append(("no_normalisation", "without normalisation (mean 0, std 1)", [0.0] * channels, [1.0] * channels))
    for name, description, m, s in stats:
        if is_identity(m, s) and is_identity(mean, std):
            continue
        if m == mean and s == std:
            continue
        out.append((name, description, "normalisation", with_pixel_input(net, m, s)))
    if channels == 3:
        out.append(("channels_reversed", "with the channels reversed (RGB <-> BGR)", "channel_order",
                    _InputChange(model, lambda t: t.flip(1))))
    out.append(("pixels_0_255", "with pixels in 0..255 instead of 0..1", "pixel_range",
                _InputChange(model, lambda t: t * 255.0)))
    return out


def _top_prediction(predicted: torch.Tensor, num_classes: int) -> tuple[float, int]:
    import torch

    counts = torch.bincount(predicted.clamp(min=0), minlength=num_classes)
    return float(counts.max()) / max(int(predicted.numel()), 1), int(counts.argmax())


def _message(r: dict[str, Any], fixing: list[dict[str, Any]], num_classes: int, data_classes: int,
             share: float, label: int) -> str:
    lo, hi = r["ci95"]
    measured = (f"Clean accuracy {r['accuracy']:.3f} (95 % interval {lo:.3f}..{hi:.3f}) on {r['n']} test images of "
                f"{r['dataset']} (a stratified sample, seed {r['seed']}); chance is {r['chance']:.3f}.")
    if r["status"] == "passed":
        return measured
    if r["near_chance"]:
        words = [f"Warning: the model barely classifies {r['dataset']}. " + measured]
    else:
        words = [f"Warning: the model classifies {r['dataset']} better with another input. " + measured]
    if share >= 0.5:
        words.append(f"It answers class {label} for {share:.0%} of the images.")
    if fixing:
        best = fixing[0]
        described = best["description"][0].upper() + best["description"][1:]
        words.append(f"{described} the accuracy is {best['accuracy']:.3f}: {CAUSES[best['cause']]}. "
                     "Register the model again with the right settings.")
    else:
        tried = "; ".join(f"{v['description']}: {v['accuracy']:.3f}" for v in r["variants"])
        if tried:
            words.append(f"None of the cheap checks fixes it ({tried}).")
        if data_classes != num_classes:
            words.append(f"The model has {num_classes} outputs but {r['dataset']} has {data_classes} classes: "
                         f"{CAUSES['num_classes']}.")
    words.append(USUAL_CAUSES[0].upper() + USUAL_CAUSES[1:] + ".")
    return " ".join(words)
