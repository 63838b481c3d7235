"""Fast W-TRADES: training wall time to the K = 10 recipe's held-out W2 robust accuracy.

    OMP_NUM_THREADS=1 python bench/fast_wtrades.py --out /tmp/fast_wtrades.json
    OMP_NUM_THREADS=1 python bench/fast_wtrades.py --quick        # digits only, 1 seed: a smoke run

For every data set and seed: a small CNN is trained normally (the input model, the same for
every method of that seed), then fine-tuned with each method through the real recipe
(core.engine.recipes.finetune.finetune, the user's defaults: auto epochs, batch and lr; β, δ the same),
the methods in a rotated order per seed so that a change of machine load hits all of them alike.
Each method's chosen checkpoint (best on the validation split, as a job returns it) is then
attacked with W-PGD-ReDLR, 50 steps, on the first `--test-examples` test images, in float32.

Methods (the default run: standard-k10, allocate, memory-k1):
- standard-k10: the default recipe, K = 10 inner steps (the baseline);
- allocate: attack_schedule "allocate" with its defaults (1 step, overshoot γ = 1.5): one
  gradient, then the batch's W2 budget goes to the images nearest the decision boundary;
  allocate-g<γ> and allocate-g1.5-b9 (β = 9) are the screened variants;
- memory-k1: attack_schedule "memory" with its defaults (1 step, step ratio 2): each image's
  perturbation from the previous epoch, re-projected into the batch's δ_B, then one step;
- memory-k2: the same with 2 steps; standard-k2: K = 2 at the default step ratio 2, i.e. the
  first-order map T(x) = x + δ_B·d followed by one step of the same size;
- memory-k1-long, memory-k2-long: memory-k1 with twice the epochs, memory-k2 with 5/3 of them;
  standard-k3-short(-b9), memory-k2-short-b9: fewer steps and 2/3 of the epochs.

Training time counts what the recipe does between evaluations (the Ῡ estimate, the attacks,
the outer steps, the memory's reads and writes), not the per-epoch validation, which is the
same for every method. Reported per method: training seconds, the ratio to standard-k10's in
the same seed (min/median/max over seeds), the W2 robust accuracy and its difference to
standard-k10's, and forward/backward passes per image per optimizer step (K + 1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.engine.attacks.wpgd import w_pgd
from core.engine.config import FinetuneConfig
from core.engine.data.datasets import ImageData, load_dataset, to_unit_float
from core.engine.defaults import resolve_finetune
from core.engine.device import Compute
from core.engine.hooks import Hooks
from core.engine.recipes.finetune import finetune
from core.engine.recipes.standard import train_standard
from core.engine.threats import Threat
from core.engine.zoo import create_model

METHODS: dict[str, dict[str, Any]] = {
    "standard-k10": {"attack_schedule": "standard", "attack_steps": 10},
    "memory-k1": {"attack_schedule": "memory", "attack_steps": 1},
    "memory-k2": {"attack_schedule": "memory", "attack_steps": 2},
    "standard-k2": {"attack_schedule": "standard", "attack_steps": 2},
    # the memory schedules given more epochs (Fashion-MNIST 6 and 5, digits 16 and 13): time to the same robustness
    "memory-k1-long": {"attack_schedule": "memory", "attack_steps": 1, "epochs_factor": 2},
    "memory-k2-long": {"attack_schedule": "memory", "attack_steps": 2, "epochs_factor": 5 / 3},
    # fewer steps AND fewer epochs (Fashion-MNIST 2, digits 5), optionally with a larger β
    "standard-k3-short": {"attack_schedule": "standard", "attack_steps": 3, "epochs_factor": 2 / 3},
    "standard-k3-short-b9": {"attack_schedule": "standard", "attack_steps": 3, "epochs_factor": 2 / 3, "beta": 9.0},
    "memory-k2-short-b9": {"attack_schedule": "memory", "attack_steps": 2, "epochs_factor": 2 / 3, "beta": 9.0},
    # budget allocation (attack_schedule "allocate", 1 step); "allocate" is its defaults (γ = 1.5), the others
    # were screened: γ = attack_overshoot, b9: β = 9
    "allocate": {"attack_schedule": "allocate", "attack_steps": 1},
    "allocate-g1.5": {"attack_schedule": "allocate", "attack_steps": 1, "attack_overshoot": 1.5},
    "allocate-g1": {"attack_schedule": "allocate", "attack_steps": 1, "attack_overshoot": 1.0},
    "allocate-g1.25": {"attack_schedule": "allocate", "attack_steps": 1, "attack_overshoot": 1.25},
    "allocate-g1.5-b9": {"attack_schedule": "allocate", "attack_steps": 1, "attack_overshoot": 1.5, "beta": 9.0},
    "allocate-g2": {"attack_schedule": "allocate", "attack_steps": 1, "attack_overshoot": 2.0},
    "allocate-g3": {"attack_schedule": "allocate", "attack_steps": 1, "attack_overshoot": 3.0},
}
DEFAULT_METHODS = ("standard-k10", "allocate", "memory-k1")
BASELINE = "standard-k10"

# Per data set: training images (after the validation split), validation images, epochs ("auto": what a
# user gets, core.engine.defaults: Fashion-MNIST's 5,000 images 7, digits' 1,138 8), pre-training.
SETUPS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"train": 5_000, "validation": 500, "epochs": "auto", "pretrain_epochs": 2, "delta": 0.05},
    "digits": {"train": None, "validation": 300, "epochs": "auto", "pretrain_epochs": 5, "delta": 0.05},
}


class TrainClock(Hooks):
    """Adds up the time spent training: from the start of training (or the end of an epoch's
    evaluation) to the start of the next evaluation, as the recipe reports them."""

    def __init__(self) -> None:
        super().__init__(progress=self._progress)
        self.seconds = 0.0
        self._since: float | None = None

    def _progress(self, fraction: float, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "train" and "step" not in info:        # training starts (epoch 0) or resumes after an epoch
            self._since = now
        elif phase == "evaluate" and info.get("epoch", 0) >= 1 and self._since is not None:
            self.seconds += now - self._since
            self._since = None


def _available(setup: dict[str, Any], data: ImageData) -> int:
    """Training images the recipe sees (before it carves out the validation split)."""
    n = data.train_x.shape[0]
    return n if setup["train"] is None else min(n, setup["train"] + setup["validation"])


def _config(setup: dict[str, Any], method: dict[str, Any], seed: int, n_available: int) -> FinetuneConfig:
    fields = {k: v for k, v in method.items() if k != "epochs_factor"}
    split = {"train_examples": n_available, "validation_examples": setup["validation"],
             "validation_fraction": setup["validation"] / n_available}
    epochs = setup["epochs"]
    if epochs == "auto":
        epochs = int(resolve_finetune(FinetuneConfig(**split), n_available).epochs)
    return FinetuneConfig(
        threat_model={"kind": "w2-linf", "delta": setup["delta"]},
        epochs=max(1, round(epochs * method.get("epochs_factor", 1))), **split,
        eval_wpgd_steps=10, eval_pgd_steps=1,
        # the recipe's own test numbers are not used (the bench attacks the chosen checkpoint itself)
        test_examples=8, test_wpgd_steps=1, test_pgd_steps=1,
        amp="off", seed=seed, **fields)


def _w2_accuracy(state: dict[str, torch.Tensor], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 delta: float) -> tuple[float, float]:
    model.load_state_dict(state)
    model.eval()
    res = w_pgd(model, x, y, Threat("w2-linf", delta), steps=50, loss="redlr", batch_size=500,
                compute=Compute.resolve("cpu", amp="off", channels_last=False))
    return res.robust_accuracy, res.clean_accuracy


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run(datasets: list[str], seeds: list[int], methods: list[str], test_examples: int, data_dir: Path,
        epochs: int | None = None, train: int | None = None) -> dict:
    runs: list[dict[str, Any]] = []
    for name in datasets:
        setup = dict(SETUPS[name])
        if epochs is not None:
            setup["epochs"] = epochs
        if train is not None:
            setup["train"], setup["validation"] = train, min(setup["validation"], max(50, train // 4))
        data = load_dataset(name, data_dir=data_dir)
        c, h, w = data.image_shape
        x_test = to_unit_float(data.test_x[:test_examples], "cpu")
        y_test = data.test_y[:test_examples]

        def fresh() -> torch.nn.Module:
            return create_model("small-cnn", num_classes=data.num_classes, in_channels=c, image_size=(h, w),
                                dataset=name)

        for s_i, seed in enumerate(seeds):
            torch.manual_seed(seed)
            n_available = _available(setup, data)
            pre = replace(data, train_x=data.train_x[:n_available], train_y=data.train_y[:n_available])
            base = train_standard(fresh(), pre, epochs=setup["pretrain_epochs"], seed=seed)
            base_state = {k: v.clone() for k, v in base.state_dict().items()}
            w2_in, clean_in = _w2_accuracy(base_state, fresh(), x_test, y_test, setup["delta"])
            order = methods[s_i % len(methods):] + methods[:s_i % len(methods)]   # rotate per seed
            for method in order:
                model = fresh()
                model.load_state_dict(base_state)
                clock = TrainClock()
                t0 = time.perf_counter()
                result = finetune(_config(setup, METHODS[method], seed, n_available), model, data, hooks=clock, device="cpu")
                total = time.perf_counter() - t0
                w2, clean = _w2_accuracy(result.best_model_state, fresh(), x_test, y_test, setup["delta"])
                steps = int(METHODS[method]["attack_steps"])
                runs.append({"dataset": name, "seed": seed, "method": method, "train_seconds": clock.seconds,
                             "recipe_seconds": total, "best_epoch": result.best_epoch,
                             "w2_robust_accuracy": w2, "clean_accuracy": clean,
                             "input_w2_robust_accuracy": w2_in, "input_clean_accuracy": clean_in,
                             "passes_per_image_per_step": steps + 1,
                             "config": {k: result.config[k] for k in ("epochs", "batch_size", "lr", "beta",
                                                                      "attack_steps", "attack_step_ratio",
                                                                      "attack_schedule", "attack_overshoot")}})
                print(f"{name:14s} seed {seed} {method:13s} train {clock.seconds:7.1f} s  "
                      f"W2 {w2:.3f}  clean {clean:.3f}  (input W2 {w2_in:.3f})", flush=True)

    summary: list[dict[str, Any]] = []
    for name in datasets:
        base_runs = {r["seed"]: r for r in runs if r["dataset"] == name and r["method"] == BASELINE}
        for method in methods:
            mine = [r for r in runs if r["dataset"] == name and r["method"] == method]
            ratios = [base_runs[r["seed"]]["train_seconds"] / r["train_seconds"] for r in mine]
            diffs = [r["w2_robust_accuracy"] - base_runs[r["seed"]]["w2_robust_accuracy"] for r in mine]
            summary.append({
                "dataset": name, "method": method, "seeds": len(mine),
                "passes_per_image_per_step": mine[0]["passes_per_image_per_step"],
                "epochs": mine[0]["config"]["epochs"],
                "train_seconds": _spread([r["train_seconds"] for r in mine]),
                "speedup_vs_k10": _spread(ratios),
                "w2_robust_accuracy": _spread([r["w2_robust_accuracy"] for r in mine]),
                "w2_difference_vs_k10": _spread(diffs),
                "clean_accuracy": _spread([r["clean_accuracy"] for r in mine]),
            })
    return {"runs": runs, "summary": summary}


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| data set | method | epochs | passes/image/step | train s (median) | speed-up vs K=10 min / median / max "
             "| W2 robust acc. (median) | W2 diff. vs K=10 min / median / max |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        sp, d = s["speedup_vs_k10"], s["w2_difference_vs_k10"]
        lines.append(f"| {s['dataset']} | {s['method']} | {s['epochs']} | {s['passes_per_image_per_step']} "
                     f"| {s['train_seconds']['median']:.1f} | {sp['min']:.2f}× / {sp['median']:.2f}× / {sp['max']:.2f}× "
                     f"| {s['w2_robust_accuracy']['median']:.3f} "
                     f"| {d['min']:+.3f} / {d['median']:+.3f} / {d['max']:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="fashion-mnist,digits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ROBUSTIFY_DATASETS_DIR", "/tmp/robustify-data")))
    p.add_argument("--quick", action="store_true", help="digits, one seed")
    p.add_argument("--epochs", type=int, help="override every data set's epochs (a smoke run)")
    p.add_argument("--train", type=int, help="override every data set's training images (a smoke run)")
    p.add_argument("--out", type=Path, help="write the JSON here")
    args = p.parse_args()
    datasets = ["digits"] if args.quick else [d.strip() for d in args.datasets.split(",")]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS] + [d for d in datasets if d not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown method or data set: {', '.join(unknown)}")
    if BASELINE not in methods:
        raise SystemExit(f"--methods must include the baseline {BASELINE}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    out = run(datasets, seeds, methods, args.test_examples, args.data_dir, args.epochs, args.train)
    out["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    out["command_seconds"] = time.perf_counter() - t0
    print(table(out["summary"]))
    print(f"total {out['command_seconds']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
