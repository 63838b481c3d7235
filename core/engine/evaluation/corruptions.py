"""Common corruptions (Hendrycks & Dietterich, ICLR 2019: ImageNet-C, CIFAR-10-C) of the user's
own test images, at their own size and channels:

    for each asked (type, severity): corrupt every image of the sample (the imagecorruptions
    package, seeded per image) → every model's accuracy on the corrupted copies, with n and a
    95 % Wilson interval → per type and overall means with bootstrap intervals over images →
    (a fine-tune) the corruption error of the checkpoint relative to the input model (mCE)

The implementation. `imagecorruptions` 1.1.2 implements the published definitions of the 15 types
(the frost pictures ship with it). It predates NumPy 2 and scikit-image 0.19, so three names it
uses are given back to it, inside its own module only (`_library`): `np.float_` (fog),
`gaussian(..., multichannel=True)` (glass blur) and skimage's `random_noise`, which since 0.19
draws from its own generator: it gets one seeded from numpy's global RNG, so that impulse noise is
as reproducible as the rest. Its frost pictures are read once instead of once per image (its
`cv2.imread`, cached). Nothing else of the package is changed.

Determinism. The package draws from numpy's global RNG. Each image is corrupted after seeding that
RNG from (job seed, type, severity, the image's index in the test split), and the RNG's state is
restored afterwards (under a lock), so a corrupted image does not depend on which other images
were sampled, on batch sizes, or on anything else in the process that uses numpy's RNG; the same
seed gives the same numbers, and the before/after of a fine-tune see the same corrupted images.

Grayscale. The package works on H×W×3 uint8 images. A one-channel image is replicated to three,
corrupted, and its first channel taken back: for a gray image every type but frost (a colour
photograph of frost, nearly gray) keeps the three channels equal or draws them independently
with the same law, so the first channel is the gray corruption. Images with another number of
channels are listed as skipped.

Small images. The package asks for at least 32×32 pixels, but most types are defined at any size.
Those that are not are skipped at the sizes where they break, each with its reason
(`skip_reason`); nothing is dropped silently: every asked cell is measured or listed as skipped,
and the report check (core.engine.evaluation.invariants) insists on it.

Intervals. Each (type, severity) accuracy is over n independent images: Wilson's interval. A mean
over cells counts each image many times, so its interval is a percentile bootstrap over images
(the same resamples for every cell, and for both models of a fine-tune: the change is paired).

For the sweep (and any caller): `corruption_summary(model, data, spec)` measures one model on a
stratified sample of a data set's test split and returns the report block (with `versus_input`
when a `baseline` model is given).
"""
from __future__ import annotations

import contextlib
import functools
import io
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from core.engine.config import (
    CORRUPTION_FAMILIES,
    CORRUPTION_TYPES,
    Corruptions,
    CorruptionSpec,
    corruption_spec,
)
from core.engine.data.datasets import ImageData, to_unit_float
from core.engine.data.sampling import stratified_indices
from core.engine.device import Compute, batches
from core.engine.evaluation.ensemble import clean_predictions
from core.engine.evaluation.intervals import wilson_interval
from core.engine.oom import AdaptiveBatch

__all__ = ["CorruptedImages", "CorruptionResult", "corrupt", "corruption_summary", "measure_corruptions", "metrics",
           "result_entry", "result_from_entry", "skip_reason", "skipped_words", "versions", "versus_input"]

Progress = Callable[[float, str], None]
FAMILY: dict[str, str] = {t: family for family, members in CORRUPTION_FAMILIES.items() for t in members}
RESAMPLES = 2000               # bootstrap resamples of the means' intervals
CHUNK = 256                    # images corrupted at a time (bounds the memory of a cell's copies)
PASSES_PER_CORRUPTION = 20     # a corrupted image costs about this many passes of a small model (progress only)

# The package's parameters that decide whether a type applies at a size (imagecorruptions 1.1.2).
MOTION_BLUR_RADIUS = (10, 15, 15, 15, 20)       # its kernel is 2·radius + 1 pixels long
SNOW_STREAK_RADIUS = 12                         # the snow layer's motion blur, every severity
DEFOCUS_RADIUS = (3, 4, 6, 8, 10)               # the disk's radius
GLASS_MAX_DELTA = (1, 2, 2, 3, 4)               # how far a pixel is swapped
PIXELATE_FACTOR = (0.6, 0.5, 0.4, 0.3, 0.25)


def skip_reason(name: str, severity: int, height: int, width: int, channels: int) -> str | None:
    """Why `name` at `severity` cannot apply to images of this shape, or None when it can."""
    side = min(height, width)
    size = f"{height}×{width}"
    if channels not in (1, 3):
        return f"the corruptions are defined for gray or RGB images, not {channels} channels"
    if name == "motion_blur" and side < (length := 2 * MOTION_BLUR_RADIUS[severity - 1] + 1):
        return (f"its blur kernel is {length} px long, longer than the {size} image: the implementation cuts the "
                "kernel at the border, which darkens the image instead of blurring it")
    if name == "snow" and side < (length := 2 * SNOW_STREAK_RADIUS + 1):
        return (f"its snow streaks are drawn with a {length} px motion blur, longer than the {size} image (the "
                "kernel would be cut at the border)")
    if name == "defocus_blur" and side < (length := 2 * DEFOCUS_RADIUS[severity - 1] + 1):
        return (f"its disk kernel is {length} px wide, wider than the {size} image: it would average reflections "
                "of the image's borders")
    if name == "glass_blur" and side <= 2 * GLASS_MAX_DELTA[severity - 1]:
        return (f"it swaps pixels up to {GLASS_MAX_DELTA[severity - 1]} px apart, away from the border: in a "
                f"{size} image no pixel moves, only its blur would apply")
    if name == "pixelate" and int(side * PIXELATE_FACTOR[severity - 1]) < 1:
        return f"it pixelates to {PIXELATE_FACTOR[severity - 1]:g} of the side, below one pixel of the {size} image"
    if name == "fog" and max(height, width) < 2:
        return f"its fractal fog needs an image of at least 2 px, not {size}"
    return None


# ------------------------------------------------------------------------------ the package
class _Module(types.ModuleType):
    """A module seen through another with some names replaced (the package's view of numpy, skimage)."""

    def __init__(self, module: types.ModuleType, **names: Any) -> None:
        super().__init__(module.__name__)
        self._module = module
        self.__dict__.update(names)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@functools.cache
def _library() -> tuple[dict[str, Callable[..., Any]], str]:
    """The package's corruption functions by name, and its version (module docstring: what is
    given back to it)."""
    with warnings.catch_warnings():     # pkg_resources and scipy.ndimage.interpolation are deprecated
        warnings.simplefilter("ignore")
        import cv2
        import imagecorruptions  # type: ignore[import-untyped]
        import skimage
        from imagecorruptions import corruptions as module
        from skimage.filters import gaussian

    def gaussian_multichannel(image: Any, sigma: Any = 1, multichannel: bool | None = None, **kw: Any) -> Any:
        return gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kw)  # type: ignore[no-untyped-call]

    def random_noise(image: Any, **kw: Any) -> Any:       # seeded from the (seeded) global RNG
        return skimage.util.random_noise(image, rng=int(np.random.randint(0, 2**31 - 1)), **kw)  # type: ignore[no-untyped-call]

    @functools.cache
    def frost_picture(path: str) -> Any:               # read once, not once per image
        return cv2.imread(path)

    setattr(module, "np", _Module(np, float_=np.float64))   # noqa: B010  (the package's own global)
    setattr(module, "gaussian", gaussian_multichannel)       # noqa: B010
    setattr(module, "sk", _Module(skimage, util=_Module(skimage.util, random_noise=random_noise)))   # noqa: B010
    setattr(module, "cv2", _Module(cv2, imread=lambda path, *a: frost_picture(path).copy()))   # noqa: B010
    try:
        from importlib.metadata import version
        release = version("imagecorruptions")
    except Exception:   # an unpackaged copy: say so rather than fail
        release = "unknown"
    functions: dict[str, Callable[..., Any]] = dict(imagecorruptions.corruption_dict)
    return functions, release


_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def _global_rng() -> Iterator[None]:
    """numpy's global RNG for the package, its state restored afterwards (module docstring)."""
    with _RNG_LOCK:
        state = np.random.get_state()
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():   # its prints, its warnings
                warnings.simplefilter("ignore")
                yield
        finally:
            np.random.set_state(state)


def _image_seed(seed: int, name: str, severity: int, image_id: int) -> int:
    return int(np.random.SeedSequence([seed, CORRUPTION_TYPES.index(name), severity, image_id]).generate_state(1)[0])


def corrupt(images: npt.NDArray[np.uint8], name: str, severity: int, *, seed: int,
            image_ids: Sequence[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """`images` (N, C, H, W) uint8, C 1 or 3, corrupted by `name` at `severity`; image i is seeded
    from (seed, name, severity, image_ids[i]) (module docstring)."""
    functions, _ = _library()
    from PIL import Image

    n, channels = images.shape[:2]
    if len(image_ids) != n:
        raise ValueError(f"one image id per image: {len(image_ids)} ids for {n} images")
    out = np.empty_like(images)
    with _global_rng():
        for i in range(n):
            hwc = images[i].transpose(1, 2, 0)
            rgb = np.repeat(hwc, 3, axis=2) if channels == 1 else hwc
            np.random.seed(_image_seed(seed, name, severity, int(image_ids[i])))
            done = np.asarray(np.asarray(functions[name](Image.fromarray(np.ascontiguousarray(rgb)), severity)),
                              dtype=np.uint8)   # as the package's corrupt(): floats truncated
            if done.shape != rgb.shape:
                raise ValueError(f"{name} returned an image of shape {done.shape} for one of {rgb.shape}")
            out[i] = (done[..., :1] if channels == 1 else done).transpose(2, 0, 1)
    return out


# ------------------------------------------------------------------------------ measuring
@dataclass
class CorruptionResult:
    """One model's outcomes on the corrupted copies of a sample."""

    spec: CorruptionSpec
    seed: int
    image_shape: tuple[int, int, int]
    clean_correct: npt.NDArray[np.bool_] = field(repr=False)
    correct: dict[tuple[str, int], npt.NDArray[np.bool_]] = field(repr=False)   # (type, severity) → per image
    skipped: list[dict[str, Any]] = field(default_factory=list)
    version: str = "unknown"

    @property
    def n(self) -> int:
        return int(self.clean_correct.shape[0])

    @property
    def cells(self) -> list[tuple[str, int]]:
        """The measured (type, severity) cells, in the standard order."""
        return [c for c in self.spec.cells if c in self.correct]

    def _matrix(self) -> npt.NDArray[np.float64]:
        """Per image × measured cell: 1.0 where the model was right."""
        if not self.cells:
            return np.zeros((self.n, 0))
        return np.stack([self.correct[c] for c in self.cells], axis=1).astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        """The report's block (docs/http-api.md lists the fields)."""
        n, cells = self.n, self.cells
        weights = _resample_weights(n, self.seed)
        matrix = self._matrix()
        boot = weights @ matrix if cells else np.zeros((RESAMPLES, 0))    # resample × cell accuracies
        rows = []
        for (name, severity), column in zip(cells, matrix.T, strict=True):
            hits = int(column.sum())
            rows.append({"type": name, "family": FAMILY[name], "severity": severity, "accuracy": hits / n if n else 0.0,
                         "n": n, "ci95": list(wilson_interval(hits, n))})
        per_type = []
        for name in self.spec.types:
            cols = [k for k, (t, _) in enumerate(cells) if t == name]
            if cols:
                per_type.append({"type": name, "family": FAMILY[name],
                                 "severities": [cells[k][1] for k in cols], "n": n,
                                 "accuracy": float(matrix[:, cols].mean()) if n else 0.0,
                                 "ci95": _percentile(boot[:, cols].mean(axis=1))})
        clean_hits = int(self.clean_correct.sum())
        out: dict[str, Any] = {
            "types": list(self.spec.types), "severities": list(self.spec.severities), "n_examples": n,
            "image_shape": list(self.image_shape),
            "clean_accuracy": clean_hits / n if n else 0.0, "clean_accuracy_ci95": list(wilson_interval(clean_hits, n)),
            "mean_accuracy": float(matrix.mean()) if cells and n else None,
            "mean_accuracy_ci95": _percentile(boot.mean(axis=1)) if cells else None,
            "cells_measured": len(cells), "cells_asked": len(self.spec.cells),
            "rows": rows, "per_type": per_type, "skipped": self.skipped,
            "seed": self.seed,
            "method": {"implementation": f"imagecorruptions {self.version}",
                       "grayscale": "replicated to 3 channels, corrupted, first channel taken back",
                       "cell_interval": "Wilson 95 % over images",
                       "mean_interval": f"percentile bootstrap over images ({RESAMPLES} resamples)",
                       "mean": "over the measured (type, severity) cells"},
        }
        return out


@dataclass
class CorruptedImages:
    """The corrupted copies of a sample, by (type, severity), and the cells whose implementation
    failed (with the reason); cells skipped for the image size are in neither (skip_reason)."""

    cells: dict[tuple[str, int], npt.NDArray[np.uint8]] = field(default_factory=dict, repr=False)
    failed: dict[tuple[str, int], str] = field(default_factory=dict)

    def add(self, cell: tuple[str, int], chunks: list[npt.NDArray[np.uint8]], failure: str | None) -> None:
        if failure is not None:
            self.failed[cell] = failure
        else:
            self.cells[cell] = np.concatenate(chunks)

    @staticmethod
    def nbytes(images: torch.Tensor, spec: CorruptionSpec) -> int:
        """The bytes the corrupted copies of `images` take at most (every cell measured)."""
        return int(images.numel()) * len(spec.cells)

    def to_entry(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and header for core.engine.cache.pack."""
        return ({f"{t}/{sev}": torch.from_numpy(a) for (t, sev), a in self.cells.items()},
                {"entry": "corrupted_images", "failed": [[t, sev, why] for (t, sev), why in self.failed.items()]})

    @classmethod
    def from_entry(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], images: torch.Tensor,
                   spec: CorruptionSpec) -> CorruptedImages | None:
        """Back from an entry; None unless it holds every cell this spec measures on these images."""
        failed = {(str(t), int(sev)): str(why) for t, sev, why in meta.get("failed", [])}
        c, h, w = (int(v) for v in images.shape[1:])
        cells = {}
        for name, severity in spec.cells:
            if skip_reason(name, severity, h, w, c) is not None or (name, severity) in failed:
                continue
            got = tensors.get(f"{name}/{severity}")
            if got is None or got.dtype != torch.uint8 or tuple(got.shape) != tuple(images.shape):
                return None
            cells[(name, severity)] = got.numpy()
        return cls(cells, failed)


def result_entry(result: CorruptionResult) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One model's CorruptionResult as tensors and header for core.engine.cache.pack."""
    tensors = {"clean": torch.from_numpy(result.clean_correct)}
    tensors.update({f"{t}/{sev}": torch.from_numpy(a) for (t, sev), a in result.correct.items()})
    return tensors, {"entry": "corruption_result", "skipped": result.skipped, "version": result.version,
                     "image_shape": list(result.image_shape)}


def result_from_entry(tensors: dict[str, torch.Tensor], meta: dict[str, Any], spec: CorruptionSpec, seed: int,
                      n: int) -> CorruptionResult | None:
    """A CorruptionResult back from result_entry's tensors and header; None when it does not fit."""
    clean = tensors.get("clean")
    if clean is None or clean.dtype != torch.bool or tuple(clean.shape) != (n,):
        return None
    correct = {}
    for name, severity in spec.cells:
        got = tensors.get(f"{name}/{severity}")
        if got is not None:
            if got.dtype != torch.bool or tuple(got.shape) != (n,):
                return None
            correct[(name, severity)] = got.numpy()
    shape = tuple(int(v) for v in meta["image_shape"])
    if len(shape) != 3:
        return None
    return CorruptionResult(spec, seed, (shape[0], shape[1], shape[2]), clean.numpy(), correct,
                            list(meta["skipped"]), str(meta["version"]))


def versions() -> dict[str, str]:
    """The versions of what makes the corrupted images (a cache key's part)."""
    from importlib.metadata import PackageNotFoundError, version

    _, release = _library()
    out = {"imagecorruptions": release, "numpy": np.__version__}
    for name in ("scikit-image", "opencv-python-headless", "opencv-python", "scipy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _resample_weights(n: int, seed: int) -> npt.NDArray[np.float64]:
    """(RESAMPLES, n): how often each image is drawn in each bootstrap resample, over n."""
    if n == 0:
        return np.zeros((RESAMPLES, 0))
    rng = np.random.default_rng([seed, 0xC0])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=RESAMPLES).astype(np.float64) / n


def _percentile(values: npt.NDArray[np.float64]) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = np.quantile(finite, [0.025, 0.975])
    return [float(lo), float(hi)]


def measure_corruptions(models: Sequence[torch.nn.Module], images: torch.Tensor, labels: torch.Tensor,
                        spec: CorruptionSpec, *, seed: int, image_ids: npt.ArrayLike | None = None,
                        compute: Compute | None = None, batch_size: int | AdaptiveBatch = 256,
                        progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                        prepared: CorruptedImages | None = None,
                        keep: CorruptedImages | None = None) -> list[CorruptionResult] | None:
    """Each model's (eval mode, on compute's device) accuracy on `images` (N, C, H, W uint8) and
    on their corrupted copies, one result per model; every model sees the same corrupted images,
    each made once. `image_ids`: the images' indices in the test split (they seed the corruption;
    default 0..N-1). `prepared`: these images' corrupted copies made before (core.engine.cache),
    used instead of corrupting again; `keep`: collects the copies made here. None when
    `should_stop()` cut it short."""
    compute = compute or Compute.resolve("cpu", amp="off", channels_last=False)
    batch = batch_size if isinstance(batch_size, AdaptiveBatch) else AdaptiveBatch(int(batch_size))
    x = images.to("cpu")
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"corruptions take (N, C, H, W) uint8 images, got {tuple(x.shape)} {x.dtype}")
    ids = np.arange(x.shape[0]) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    y = labels.to(compute.device)
    c, h, w = (int(v) for v in x.shape[1:])
    _, release = _library()

    def outcomes(corrupted: torch.Tensor) -> list[npt.NDArray[np.bool_]]:
        unit = compute.images(to_unit_float(corrupted, compute.device))
        out = []
        with torch.no_grad():
            for model in models:
                pred = batch.run("corruptions", functools.partial(_predictions, model, unit, compute))
                out.append(pred.eq(y).cpu().numpy())
        return out

    results = [CorruptionResult(spec, seed, (c, h, w), clean, {}, [], release) for clean in outcomes(x)]
    cells = spec.cells
    for k, (name, severity) in enumerate(cells):
        if should_stop is not None and should_stop():
            return None
        if progress is not None:
            progress(k / len(cells), f"corruptions: {name} {severity}")
        reason = skip_reason(name, severity, h, w, c)
        if reason is None and prepared is not None:
            reason = prepared.failed.get((name, severity))
        if reason is None:
            made = prepared.cells.get((name, severity)) if prepared is not None else None
            chunks: list[npt.NDArray[np.uint8]] = []
            corrupting = True
            try:
                parts = []
                for s in batches(x.shape[0], CHUNK):
                    corrupting = True
                    chunk = made[s] if made is not None else corrupt(x[s].numpy(), name, severity, seed=seed,
                                                                     image_ids=ids[s])
                    corrupting = False
                    chunks.append(chunk)
                    parts.append(outcomes(torch.from_numpy(chunk)))
            except Exception as exc:   # the package failed on these images: listed, never dropped
                reason = f"the implementation failed: {type(exc).__name__}: {exc}"
            if keep is not None and (reason is None or corrupting):   # a model's failure is not the images'
                keep.add((name, severity), chunks, reason)
        if reason is not None:
            for r in results:
                r.skipped.append({"type": name, "severity": severity, "reason": reason})
            continue
        for m, r in enumerate(results):
            r.correct[(name, severity)] = np.concatenate([p[m] for p in parts])
    if progress is not None:
        progress(1.0, "corruptions")
    return results


def _predictions(model: torch.nn.Module, x: torch.Tensor, compute: Compute, batch_size: int) -> torch.Tensor:
    return clean_predictions(model, x, batch_size, compute)


def versus_input(before: CorruptionResult, after: CorruptionResult) -> dict[str, Any]:
    """The corruption error of `after` relative to `before` (the input model) on the same images,
    as Hendrycks & Dietterich define it with their baseline: per type CE = Σ_s E_after / Σ_s E_before
    over the measured severities, mCE = the mean over types (1: as the input model; below 1: fewer
    errors under corruption). The relative mCE divides the degradations (E_s − E_clean) instead.
    With the change of the mean corruption accuracy; every interval a paired bootstrap over images."""
    if before.n != after.n or before.cells != after.cells:
        raise ValueError("before and after must be measured on the same images and cells")
    cells = after.cells
    weights = _resample_weights(after.n, after.seed)
    errors = {}
    for label, result in (("before", before), ("after", after)):
        matrix = result._matrix()
        point = 1.0 - (matrix.mean(axis=0) if result.n else np.zeros(len(cells)))
        boot = 1.0 - weights @ matrix if cells else np.zeros((RESAMPLES, 0))
        clean = result.clean_correct.astype(np.float64)
        errors[label] = (point, boot, 1.0 - (clean.mean() if result.n else 0.0), 1.0 - weights @ clean)
    per_type = []
    ce_point, rce_point, ce_boot, rce_boot = [], [], [], []
    (eb, bb, cb, cbb), (ea, ba, ca, cba) = errors["before"], errors["after"]
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in after.spec.types:
            cols = [k for k, (t, _) in enumerate(cells) if t == name]
            if not cols:
                continue
            ce = _ratio(ea[cols].sum(), eb[cols].sum())
            rce = _ratio((ea[cols] - ca).sum(), (eb[cols] - cb).sum())
            per_type.append({"type": name, "ce": ce, "relative_ce": rce})
            ce_point.append(ce)
            rce_point.append(rce)
            ce_boot.append(ba[:, cols].sum(axis=1) / bb[:, cols].sum(axis=1))
            degradation = bb[:, cols].sum(axis=1) - len(cols) * cbb
            rce_boot.append(np.where(degradation > 0, (ba[:, cols].sum(axis=1) - len(cols) * cba) / degradation,
                                     np.nan))
    change = weights @ (after._matrix() - before._matrix()) if cells else np.zeros((RESAMPLES, 0))
    return {
        "baseline": "the input model",
        "mce": _mean(ce_point), "mce_ci95": _percentile(np.mean(ce_boot, axis=0)) if ce_boot else None,
        "relative_mce": _mean(rce_point),
        "relative_mce_ci95": _percentile(np.mean(rce_boot, axis=0)) if rce_boot else None,
        "per_type": per_type,
        "mean_accuracy_change": float((after._matrix() - before._matrix()).mean()) if cells and after.n else None,
        "mean_accuracy_change_ci95": _percentile(change.mean(axis=1)) if cells else None,
        "method": f"paired percentile bootstrap over images ({RESAMPLES} resamples); a type whose input model made "
                  "no error (CE) or lost nothing to the corruption (relative CE) has no ratio and is left out of "
                  "the mean",
    }


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def metrics(block: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers a summary (or a before/after row, a sweep's frontier) shows of a block."""
    out = {"mean_corruption_accuracy": block.get("mean_accuracy"),
           "mean_corruption_accuracy_ci95": block.get("mean_accuracy_ci95")}
    vs = block.get("versus_input")
    if isinstance(vs, dict):
        out.update(corruption_mce=vs.get("mce"), corruption_mce_ci95=vs.get("mce_ci95"))
    return out


def passes(spec: CorruptionSpec | None, models: int) -> float:
    """About the cost per image of measuring `spec` on `models`, in forward/backward passes (for
    progress and its ETA only): corrupting an image costs about PASSES_PER_CORRUPTION passes of a
    small model, then each model takes one forward pass."""
    return 0.0 if spec is None else len(spec.cells) * (PASSES_PER_CORRUPTION + models)


def skipped_words(block: dict[str, Any]) -> str | None:
    """One line naming the skipped cells by type (the reasons are in the block), or None."""
    by_type: dict[str, list[int]] = {}
    for cell in block.get("skipped") or []:
        by_type.setdefault(cell["type"], []).append(cell["severity"])
    if not by_type:
        return None
    parts = [f"{name} (severit{'y' if len(s) == 1 else 'ies'} {', '.join(map(str, s))})" for name, s in by_type.items()]
    return (f"{sum(map(len, by_type.values()))} of {block.get('cells_asked')} corruption cells were not measured: "
            + "; ".join(parts) + " (report.corruptions.skipped says why for each)")


def corruption_summary(model: torch.nn.Module, data: ImageData, spec: Corruptions | dict[str, Any] = True, *,
                       n_examples: int | None = None, seed: int = 0, device: str | torch.device | None = None,
                       baseline: torch.nn.Module | None = None, batch_size: int = 256) -> dict[str, Any]:
    """`model`'s corruption block on a seeded stratified sample of `n_examples` test images of
    `data` (all of them: None), as the reports carry it; with `baseline` (e.g. a sweep's input
    model) measured on the same corrupted images, `versus_input` too. `spec`: what the recipes'
    `corruptions` field takes (true, a list of types, {types, severities, n_examples})."""
    chosen = corruption_spec(spec)
    if chosen is None:
        raise ValueError("corruption_summary needs corruptions to measure (spec is false or null)")
    indices = stratified_indices(data.test_y.numpy(), n_examples, seed)
    if chosen.n_examples is not None:
        indices = indices[stratified_indices(data.test_y.numpy()[indices], chosen.n_examples, seed)]
    compute = Compute.resolve(device, amp="off", channels_last=False)
    models = [m.to(compute.device).eval() for m in ([baseline, model] if baseline is not None else [model])]
    chosen_t = torch.from_numpy(np.asarray(indices))
    results = measure_corruptions(models, data.test_x[chosen_t], data.test_y[chosen_t], chosen, seed=seed,
                                  image_ids=indices, compute=compute, batch_size=batch_size)
    assert results is not None          # nothing can stop it
    block = results[-1].to_dict()
    if baseline is not None:
        block["versus_input"] = versus_input(results[0], results[1])
    return block
