"""What each evaluation preset costs, per 1,000 test images, and whether the W2 bootstrap may
resample per-image outcomes.

    OMP_NUM_THREADS=1 python bench/eval_presets.py --model digits-cnn --n 200
    python bench/eval_presets.py --model preact-resnet-18 --n 32          # default threads
    python bench/eval_presets.py --bootstrap-check                          # the W2 interval question
    OMP_NUM_THREADS=1 python bench/eval_presets.py --autoattack-parts --n 100   # FAB-T and Square on a CPU

Models (CPU, float32, the recipe's own `evaluate`, the audit included and timed apart):
- digits-cnn: the demo's start, the zoo's small-cnn trained normally for 5 epochs on scikit-learn's
  digits (8×8×1), at the demo's δ = 0.1 (w2-linf), on a stratified sample of the test split.
- preact-resnet-18: the zoo's PreAct-ResNet-18 on 32×32×3 images (Fashion-MNIST padded to 32 and
  repeated to 3 channels, the Debian IDX files), trained normally for 2 epochs on 2,000 training
  images (about 75 % clean accuracy), at δ = 8/255 (w2-linf). A real if weak classifier, so the
  adaptive attacks stop where a real model makes them stop.
Each run prints seconds for the pointwise attack, the W2 ensemble and the audit, the steps every
W-PGD attack took, and the seconds per 1,000 images (time × 1000 / n: every phase is linear in n
for a fixed number of steps).

--bootstrap-check: the W2 accuracy's sampling spread two ways on the demo's digits model and its
whole test split: (a) the percentile bootstrap of the per-image outcomes of the attacked set,
(b) the cheap attack (W-PGD-ReDLR, 20 steps) re-run on `--resamples` bootstrap resamples of the
images, which lets the shared budget re-allocate on each resample. Prints both standard deviations.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.engine.config import EvaluateConfig
from core.engine.data.datasets import ImageData, load_dataset
from core.engine.hooks import Hooks
from core.engine.recipes.evaluate import evaluate
from core.engine.recipes.standard import train_standard
from core.engine.zoo import create_model

DATA_DIR = "/tmp/robustify-bench-data"


def digits_model() -> tuple[torch.nn.Module, ImageData, float]:
    data = load_dataset("digits", data_dir=DATA_DIR)
    torch.manual_seed(0)
    model = train_standard(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8), data,
                           epochs=5, seed=0)
    return model, data, 0.1


def _to_32x3(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) → (N, 3, 32, 32): zero-padded by 2 and the channel repeated."""
    return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()


def preact_model() -> tuple[torch.nn.Module, ImageData, float]:
    fm = load_dataset("fashion-mnist", data_dir=DATA_DIR)
    g = torch.Generator().manual_seed(0)
    train = torch.randperm(fm.train_y.shape[0], generator=g)[:2000]
    data = ImageData("fashion-mnist-32x32x3", _to_32x3(fm.train_x[train]), fm.train_y[train],
                     _to_32x3(fm.test_x), fm.test_y, fm.num_classes, fm.class_names)
    torch.manual_seed(0)
    model = train_standard(create_model("preact-resnet-18", num_classes=10, in_channels=3, image_size=32), data,
                           epochs=2, seed=0)
    return model, data, 8 / 255


class PhaseClock:
    """Seconds spent per phase family (pointwise, w-pgd, audit), from the recipe's progress hook."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current, self.since = "pointwise", time.perf_counter()   # the recipe starts with the pointwise attack

    def __call__(self, fraction: float, phase: str, metrics: dict[str, Any]) -> None:
        family = ("audit" if phase.startswith("audit") else "w2 ensemble" if phase.startswith("w-pgd")
                  else "done" if phase == "done" else "pointwise")
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.current, self.since = family, now


def cost(model_name: str, n: int, presets: list[str]) -> list[dict[str, Any]]:
    model, data, delta = digits_model() if model_name == "digits-cnn" else preact_model()
    rows = []
    for preset in presets:
        clock = PhaseClock()
        config = EvaluateConfig(threat_model={"kind": "w2-linf", "delta": delta}, evaluation=preset, n_examples=n)
        t0 = time.perf_counter()
        report = evaluate(config, model, data, Hooks(progress=clock), device="cpu")
        total = time.perf_counter() - t0
        w2 = report.w2[0]
        per_1000 = {k: round(v * 1000 / n, 1) for k, v in clock.seconds.items() if k != "done"}
        rows.append({"model": model_name, "preset": preset, "n": n, "threads": torch.get_num_threads(),
                     "load_average": round(os.getloadavg()[0], 1),
                     "seconds": round(total, 1), "seconds_per_1000_images": round(total * 1000 / n, 1),
                     "per_1000_by_phase": per_1000, "pointwise": report.summary.get("linf_attack"),
                     "attack_steps": {a["attack"]: a["steps"] for a in w2["attacks"]},
                     "converged": w2["converged"], "clean": report.clean_accuracy,
                     "w2": w2["robust_accuracy"], "linf": report.summary.get("linf_robust_accuracy"),
                     "audit": report.summary.get("audit")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def autoattack_parts(model_name: str, n: int) -> dict[str, Any]:
    """AutoAttack's standard version attack by attack: the seconds of each (per 1,000 images) and the
    robust accuracy after it, i.e. what FAB-T and Square add to APGD-CE + APGD-T on a CPU."""
    from core.engine.attacks.autoattack import autoattack
    from core.engine.data.datasets import to_unit_float
    from core.engine.data.sampling import stratified_indices
    from core.engine.threats import Threat

    model, data, delta = digits_model() if model_name == "digits-cnn" else preact_model()
    idx = torch.from_numpy(stratified_indices(data.test_y.numpy(), n, 0))
    x, y = to_unit_float(data.test_x[idx], torch.device("cpu")), data.test_y[idx]
    marks: list[tuple[str, float]] = []
    result = autoattack(model.eval(), x, y, Threat("linf", delta), batch_size=256,
                        on_attack=lambda name, k, total: marks.append((name, time.perf_counter())))
    marks.append(("end", time.perf_counter()))
    seconds = {a: round((marks[i + 1][1] - t) * 1000 / n, 1) for i, (a, t) in enumerate(marks[:-1])}
    out = {"model": model_name, "n": n, "threads": torch.get_num_threads(),
           "load_average": round(os.getloadavg()[0], 1), "seconds_per_1000_images": seconds,
           "accuracy_after": result.accuracy_after, "clean": result.clean_accuracy}
    print(json.dumps(out), flush=True)
    return out


def bootstrap_check(resamples: int) -> dict[str, Any]:
    from core.engine.attacks.wpgd import w_pgd
    from core.engine.threats import Threat

    model, data, delta = digits_model()
    x = data.test_x.float() / 255
    y = data.test_y
    threat = Threat("w2-linf", delta)
    full = w_pgd(model.eval(), x, y, threat, steps=20, keep_correct=True)
    assert full.correct is not None
    outcomes = full.correct.numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    n = len(outcomes)
    per_image = [outcomes[rng.integers(0, n, n)].mean() for _ in range(2000)]
    rerun = []
    for _ in range(resamples):
        idx = torch.from_numpy(rng.integers(0, n, n))
        rerun.append(w_pgd(model, x[idx], y[idx], threat, steps=20).robust_accuracy)
    out = {"n": n, "w2_full_set": full.robust_accuracy,
           "sd_per_image_bootstrap": float(np.std(per_image, ddof=1)),
           "sd_attack_rerun_on_resamples": float(np.std(rerun, ddof=1)), "resamples_rerun": resamples,
           "mean_attack_rerun": float(np.mean(rerun))}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["digits-cnn", "preact-resnet-18"], default="digits-cnn")
    parser.add_argument("--n", type=int, default=200, help="test images (a stratified sample)")
    parser.add_argument("--presets", default="quick,standard")
    parser.add_argument("--bootstrap-check", action="store_true")
    parser.add_argument("--resamples", type=int, default=40)
    parser.add_argument("--autoattack-parts", action="store_true",
                        help="time AutoAttack's four attacks one by one instead of the presets")
    args = parser.parse_args()
    if args.autoattack_parts:
        autoattack_parts(args.model, args.n)
    elif args.bootstrap_check:
        bootstrap_check(args.resamples)
    else:
        cost(args.model, args.n, args.presets.split(","))


if __name__ == "__main__":
    main()
