"""The engine as Python functions, on a live `nn.Module` and tensors or a DataLoader: no files, no service.

Documented as `robustify.engine` (docs/python-api.md), which re-exports this module. Each function is
a thin layer over a recipe (core.engine.recipes.evaluate, core.engine.recipes.finetune): it turns
what a notebook holds into what the recipe takes, an `ImageData` of uint8 images, a validated config
and a model that takes [0, 1] pixels, and hands back the report the service would store as the job's
report.json. The algorithm, its defaults and its checks are the recipes' own.

Data (`data`, `train_data`, `test_data`) may be:
- `(images, labels)`: tensors or numpy arrays; images N×C×H×W (N×H×W×C and N×H×W are read too),
  floats in [0, 1] or uint8 0..255; labels integers;
- an iterable of `(images, labels)` batches (a torch DataLoader) or of single `(image, label)` pairs
  (a map-style Dataset);
- an `ImageData` (`load_dataset("digits")`), or a built-in data set's name or an `.npz` path.
Images are held as 8-bit pixels, as every data set of the service is: float pixels are rounded to
the nearest 1/255. Pixels outside [0, 1] are refused with the usual cause named: a model trained on
normalised inputs takes `input_mean` / `input_std`, and the engine normalises.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.data.datasets import ImageData
from core.engine.data.datasets import load_dataset as _load_dataset
from core.engine.data.npz import stratified_split, validate_npz_arrays
from core.engine.hooks import Hooks
from core.engine.recipes import evaluate as _evaluate
from core.engine.recipes import finetune as _finetune
from core.engine.zoo import create_model, with_pixel_input
from robustify.radius import parse_radius  # "8/255" as the SDK reads it (torch-free, the lowest floor)

__all__ = ["FinetuneOutput", "ImageData", "create_model", "evaluate", "finetune", "image_data", "load_dataset"]

log = logging.getLogger("robustify.engine")

DataLike = ImageData | str | Path | tuple[Any, Any] | Iterable[Any]
Progress = bool | Callable[[float, str, dict[str, Any]], None]

# Slack on [0, 1] for float pixels that went through arithmetic (1/255 steps are far wider).
_RANGE_SLACK = 1e-4


class FinetuneOutput(NamedTuple):
    """What `finetune` returns: `model, report = finetune(...)`."""

    model: nn.Module         # a copy of the input module holding the chosen checkpoint's weights (eval mode)
    report: dict[str, Any]   # the job's report.json: before/after on the test split, verdict, history, ...


def load_dataset(name: str | Path, *, data_dir: str | Path = ".", allow_download: bool = False) -> ImageData:
    """A built-in data set (digits, fashion-mnist, cifar10, cifar100) or an `.npz`, split as the
    service splits it (digits: stratified, 20 % test, seed 0), as uint8 tensors."""
    return _load_dataset(str(name), data_dir=data_dir, allow_download=allow_download)


def image_data(data: DataLike, test: DataLike | None = None, *, name: str = "tensors",
               class_names: Sequence[str] | None = None, num_classes: int | None = None,
               test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """`data` (the module docstring's forms) as an ImageData. With `test`, that is the test split;
    else images and labels are split per class (`test_fraction`, `seed`; as the service splits an
    uploaded `.npz`). An ImageData, a name or a path is loaded as it is (no `test` then)."""
    if isinstance(data, ImageData | str | Path):
        if test is not None:
            raise ValueError("an ImageData, a data set name or a path brings its own test split; give no test data")
        return data if isinstance(data, ImageData) else load_dataset(data)
    x, y = _images_and_labels(data)
    if test is None:
        train_idx, test_idx = stratified_split(y, test_fraction=test_fraction, seed=seed)
        x_test, y_test = x[test_idx], y[test_idx]
        x, y = x[train_idx], y[train_idx]
    else:
        x_test, y_test = _images_and_labels(test)
    if x.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"training images are {list(x.shape[1:])} and test images {list(x_test.shape[1:])}: "
                         "both splits need one image shape")
    found = int(max(y.max(initial=0), y_test.max(initial=0))) + 1
    classes = num_classes or (len(class_names) if class_names else found)
    if found > classes:
        raise ValueError(f"labels go up to {found - 1}, but the model has {classes} classes")
    return ImageData(name=name, train_x=torch.from_numpy(x), train_y=torch.from_numpy(y),
                     test_x=torch.from_numpy(x_test), test_y=torch.from_numpy(y_test), num_classes=classes,
                     class_names=list(class_names) if class_names else None)


def evaluate(model: nn.Module, data: DataLike, *, threat: str | Mapping[str, Any] = "w2-linf",
             delta: float | str | None = None, deltas: Sequence[float | str] | None = None,
             input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None,
             class_names: Sequence[str] | None = None, device: str | torch.device | None = None,
             progress: Progress = False, **config: Any) -> dict[str, Any]:
    """Clean, W2 and pointwise robust accuracy of `model` on `data`, as an evaluation job measures it.

    `data` is the test set (every image of it, or a seeded stratified sample with `n_examples`); an
    ImageData, name or path is evaluated on its test split. `threat`: "w2-linf" (default), "w2-l2",
    "linf" or "l2", or {"kind", "delta"}; `delta` its radius in [0, 1] pixel units ("8/255" works;
    default 8/255 for l∞ ground cost, 0.5 for l2); `deltas` several radii for a curve. `input_mean` /
    `input_std`: the per-channel normalisation the model expects (the engine feeds it (x - mean) / std).
    Any other EvaluateConfig field goes in `config` (evaluation="quick", n_examples=500, seed=1, ...).
    `progress`: True for a progress bar, or a callable(fraction, phase, metrics).

    Returns the evaluation's report.json (`summary`, `w2` and `pointwise` rows per radius, `audit`,
    `per_class`, `provenance`, ...); `robustify.Outcome.from_report(report)` reads it as typed objects.
    The recipe runs on a copy of `model`: the module passed in is not changed (nor moved).
    """
    if isinstance(data, ImageData | str | Path):
        data = image_data(data)
    else:   # every image is a test image
        x, y = _images_and_labels(data)
        data = ImageData(name="tensors", train_x=torch.from_numpy(x[:0]), train_y=torch.from_numpy(y[:0]),
                         test_x=torch.from_numpy(x), test_y=torch.from_numpy(y), num_classes=0)
    fields = {**config, "threat_model": _threat_spec(threat, delta)}
    if deltas is not None:
        fields["deltas"] = [parse_radius(d) for d in deltas]
    cfg = EvaluateConfig.model_validate(fields)
    net = with_pixel_input(copy.deepcopy(model), input_mean, input_std)
    data = _with_classes(net, data, class_names)
    hooks, close = _hooks(progress)
    try:
        report = _evaluate.evaluate(cfg, net, data, hooks, device=device, context=_context(model, data))
    finally:
        close()
    return report.to_dict()


def finetune(model: nn.Module, train_data: DataLike, *, test_data: DataLike | None = None,
             threat: str | Mapping[str, Any] = "w2-linf", delta: float | str | None = None,
             epochs: int | str = "auto", input_mean: Sequence[float] | None = None,
             input_std: Sequence[float] | None = None, class_names: Sequence[str] | None = None,
             test_fraction: float = 0.2, device: str | torch.device | None = None, progress: Progress = False,
             **config: Any) -> FinetuneOutput:
    """W-TRADES fine-tuning of `model`, as a fine-tuning job runs it: the checkpoint is chosen on a
    validation split of `train_data`, and the before/after numbers are measured on `test_data`
    (default: a stratified `test_fraction` of `train_data`, held out; an ImageData, name or path uses
    its own test split).

    `threat`, `delta`, `input_mean`, `input_std`, `device` and `progress` as for `evaluate`; `epochs`
    and any other FinetuneConfig field (batch_size, lr, beta, evaluation="quick", test_examples, seed,
    ...) as a job's config, with the same "auto" defaults.

    Returns `FinetuneOutput(model, report)`: a copy of `model` holding the chosen checkpoint's weights
    (the input model itself when no epoch beat it: report["best_epoch"] == 0), in eval mode on the
    device it ran on, and the job's report.json (before/after with intervals, `verdict`, `improved`,
    per-epoch `history`, ...). The module passed in is not changed.
    """
    data = image_data(train_data, test_data, class_names=class_names, test_fraction=test_fraction,
                      seed=int(config.get("seed", 0)))
    cfg = FinetuneConfig.model_validate({**config, "epochs": epochs, "threat_model": _threat_spec(threat, delta)})
    work = copy.deepcopy(model)
    net = with_pixel_input(work, input_mean, input_std)
    data = _with_classes(net, data, class_names)
    hooks, close = _hooks(progress)
    try:
        result = _finetune.finetune(cfg, net, data, hooks, device=device, context=_context(model, data))
        if not result.stopped:
            hooks.progress(1.0, "done", {})   # the recipe leaves the end to its caller (a job's worker)
    finally:
        close()
    net.load_state_dict(result.best_model_state)
    work = work.to(memory_format=torch.contiguous_format).eval()
    return FinetuneOutput(work, result.report)


def _threat_spec(threat: str | Mapping[str, Any], delta: float | str | None) -> dict[str, Any]:
    """{"kind", "delta"} of a threat given as its kind or as a mapping, `delta` (a number or "8/255") winning."""
    spec: dict[str, Any] = {"kind": threat} if isinstance(threat, str) else dict(threat)
    if delta is not None:
        spec["delta"] = delta
    if spec.get("delta") is not None:
        spec["delta"] = parse_radius(spec["delta"])
    return spec


# --- data ----------------------------------------------------------------------------------------

def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _images_and_labels(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x N×C×H×W uint8, y int64) of a pair of arrays, or of an iterable of batches or samples."""
    if isinstance(data, tuple | list) and len(data) == 2 and not isinstance(data[0], tuple | list):
        x, y = _as_numpy(data[0]), _as_numpy(data[1])
    else:
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        for item in data:
            if not isinstance(item, tuple | list) or len(item) < 2:
                raise TypeError("data must yield (images, labels) batches or (image, label) pairs, "
                                f"got {type(item).__name__}")
            bx, by = _as_numpy(item[0]), _as_numpy(item[1])
            single = by.ndim == 0
            xs.append(bx[None] if single else bx)
            ys.append(by.reshape(1) if single else by)
        if not xs:
            raise ValueError("the data holds no images")
        x, y = np.concatenate(xs), np.concatenate(ys)
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got {y.dtype}")
    return validate_npz_arrays(_pixels(x), y.astype(np.int64))


def _pixels(x: np.ndarray) -> np.ndarray:
    """Images as uint8: floats in [0, 1] times 255, rounded; integers in 0..255 as they are."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "fiub":
        raise TypeError(f"images must be numbers, got {x.dtype}")
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise ValueError("images hold NaN or infinite values")
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise ValueError(
                f"float images must be pixels in [0, 1], got values in [{low:.3g}, {high:.3g}]. A model trained on "
                "normalised inputs (transforms.Normalize) takes the unnormalised images and input_mean= / "
                "input_std=; images of 0-255 values are passed as uint8.")
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    if low < 0 or high > 255:
        raise ValueError(f"integer images must be pixel values 0..255, got values in [{low:g}, {high:g}]")
    return x.astype(np.uint8)


# --- the model, hooks and provenance ------------------------------------------------------------

def _with_classes(net: nn.Module, data: ImageData, class_names: Sequence[str] | None) -> ImageData:
    """`data` (a copy) with the model's class count (its logits for one test image), checked against
    the labels, and the class names when given."""
    first = next(iter(net.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            logits = net(data.test_x[:1].to(device).float().div(255.0))
    finally:
        net.train(was_training)
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits of shape [batch, classes], got {list(logits.shape)}")
    classes = int(logits.shape[1])
    top = int(max(data.train_y.max(), data.test_y.max()) if data.train_y.numel() else data.test_y.max())
    if top >= classes:
        raise ValueError(f"labels go up to {top}, but the model returns {classes} logits")
    if class_names and len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names for a model with {classes} classes")
    return dataclasses.replace(data, num_classes=classes,
                               class_names=list(class_names) if class_names else data.class_names)


def _hooks(progress: Progress) -> tuple[Hooks, Callable[[], None]]:
    """The recipe's hooks: warnings to the `robustify.engine` logger, progress to a bar or a callable."""
    def warn(message: str, data: dict[str, Any]) -> None:
        log.warning(message)

    def event(type: str, message: str, data: dict[str, Any]) -> None:
        log.info("%s: %s", type, message)

    if callable(progress):
        return Hooks(progress=progress, warn=warn, event=event), lambda: None
    if not progress:
        return Hooks(warn=warn, event=event), lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def show(fraction: float, phase: str, metrics: dict[str, Any]) -> None:
        bar.set_description(phase, refresh=False)
        bar.update(max(0, int(fraction * 1000) - bar.n))

    return Hooks(progress=show, warn=warn, event=event), bar.close


def _context(model: nn.Module, data: ImageData) -> dict[str, Any]:
    """What the report's provenance says about the inputs of an in-process run."""
    return {"model": f"{type(model).__module__}.{type(model).__qualname__} (in process)", "dataset": data.name}
