"""Fast W-TRADES: training wall time to the K = 10 recipe's W2 robust accuracy, with the settings
screened on validation images and the test images attacked once, for the final table.

    OMP_NUM_THREADS=1 python bench/fast_wtrades.py --datasets digits --methods standard-k10 \
        --screen allocate-g1,allocate-g1.25,allocate-g1.5,allocate-g1.5-b9,allocate-g2,allocate-g3
    OMP_NUM_THREADS=1 python bench/fast_wtrades.py --quick        # digits only, 1 seed: a smoke run

Three disjoint image sets per data set, each a seeded stratified sample (core.engine.data.sampling):
- training images (the recipe carves its own validation split out of them, which picks the checkpoint);
- screen images: training images withheld from the fine-tune (the same for every seed). Every run's
  checkpoint is attacked on them; they choose, among the `--screen` candidates, the one that goes
  into the final table (the largest worst-seed difference to K = 10, then the largest median);
- test images (`--test-examples`): attacked once, for the final table, and only for `--methods`
  and the screen's choice. The recipe never sees them (its own test split is the screen images).

For every data set and seed: a small CNN is trained normally (the input model, the same for
every method of that seed), then fine-tuned with each method through the real recipe
(core.engine.recipes.finetune.finetune, the user's defaults: auto epochs, batch and lr; β, δ the
same), the methods in a rotated order per seed so that a change of machine load hits all of them
alike. Each chosen checkpoint (best on the recipe's validation split, as a job returns it) is
attacked in float32 by W-PGD-ReDLR (50 steps) and W-PGD with cross-entropy (200 steps) at δ, and by
W-PGD-ReDLR at 2δ. "W2" is the smaller of the two attacks at δ (each is an upper bound of the
robust accuracy); every accuracy carries n and its 95 % Wilson interval.

Methods (`METHODS`):
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
same for every method; the job time is the whole fine-tune call (the per-epoch validation and the
recipe's own before/after on the screen images, with the "quick" evaluation preset, included).
Reported per method: both times, the training-time ratio to standard-k10's in the same seed
(min/median/max over seeds), the accuracies with n and interval (of the median seed's run), the W2
difference to standard-k10's, and forward/backward passes per image per optimizer step (K + 1).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.engine.attacks.wpgd import w_pgd
from core.engine.config import FinetuneConfig
from core.engine.data.datasets import ImageData, load_dataset, to_unit_float
from core.engine.data.sampling import stratified_indices
from core.engine.defaults import resolve_finetune
from core.engine.device import Compute
from core.engine.evaluation.intervals import wilson_interval
from core.engine.hooks import Hooks
from core.engine.losses import LossName
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

# Per data set: training images (after the validation split), validation images, screen images (withheld
# from training), epochs ("auto": what a user gets, core.engine.defaults), pre-training, δ.
SETUPS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"train": 5_000, "validation": 500, "screen": 1_000, "epochs": "auto", "pretrain_epochs": 2,
                      "delta": 0.05},
    "digits": {"train": None, "validation": 300, "screen": 300, "epochs": "auto", "pretrain_epochs": 5, "delta": 0.05},
}
SAMPLE_SEED = 0          # the screen, training and test samples: the same images for every seed
ATTACKS: tuple[tuple[str, LossName, int, float], ...] = (   # (name, loss, steps, radius as a multiple of δ)
    ("redlr", "redlr", 50, 1.0),
    ("ce", "ce", 200, 1.0),
    ("redlr_2delta", "redlr", 50, 2.0),
)


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


@dataclass(frozen=True)
class Splits:
    """The fine-tune's data (its test split is the screen images), and the two attacked sets."""

    finetune: ImageData
    screen: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def make_splits(setup: dict[str, Any], data: ImageData, test_examples: int) -> Splits:
    """Seeded stratified samples: screen images out of the training images, the fine-tune's
    images out of the rest, test images out of the test split; disjoint by construction."""
    screen_idx = stratified_indices(data.train_y.numpy(), setup["screen"], SAMPLE_SEED)
    rest = np.setdiff1d(np.arange(len(data.train_y)), screen_idx)
    wanted = None if setup["train"] is None else setup["train"] + setup["validation"]
    train_idx = rest[stratified_indices(data.train_y[rest].numpy(), wanted, SAMPLE_SEED)]
    test_idx = stratified_indices(data.test_y.numpy(), test_examples, SAMPLE_SEED)
    sx, sy = data.train_x[screen_idx], data.train_y[screen_idx]
    finetune_data = replace(data, train_x=data.train_x[train_idx], train_y=data.train_y[train_idx],
                            test_x=sx, test_y=sy)
    return Splits(finetune_data, (to_unit_float(sx, "cpu"), sy),
                  (to_unit_float(data.test_x[test_idx], "cpu"), data.test_y[test_idx]))


def _config(setup: dict[str, Any], method: dict[str, Any], seed: int, n_available: int) -> FinetuneConfig:
    fields = {k: v for k, v in method.items() if k != "epochs_factor"}
    split = {"validation_examples": setup["validation"], "validation_fraction": setup["validation"] / n_available}
    epochs = setup["epochs"]
    if epochs == "auto":
        epochs = int(resolve_finetune(FinetuneConfig(**split), n_available).epochs)
    return FinetuneConfig(
        threat_model={"kind": "w2-linf", "delta": setup["delta"]},
        epochs=max(1, round(epochs * method.get("epochs_factor", 1))), **split,
        # the recipe's own before/after (on the screen images) with the quick preset: the same cost for every
        # method, and the bench attacks the checkpoints itself
        eval_wpgd_steps=10, eval_pgd_steps=1, evaluation="quick", amp="off", seed=seed, **fields)


def accuracy(correct: int, n: int) -> dict[str, Any]:
    """An accuracy with its n and 95 % Wilson interval."""
    return {"accuracy": correct / n, "n": n, "ci95": list(wilson_interval(correct, n))}


def attack(state: dict[str, torch.Tensor], model: torch.nn.Module, images: tuple[torch.Tensor, torch.Tensor],
           delta: float) -> dict[str, Any]:
    """The checkpoint's clean accuracy and each of ATTACKS, and "w2": the smaller of those at δ."""
    model.load_state_dict(state)
    model.eval()
    x, y = images
    n = int(y.shape[0])
    compute = Compute.resolve("cpu", amp="off", channels_last=False)
    out: dict[str, Any] = {}
    for name, loss, steps, factor in ATTACKS:
        res = w_pgd(model, x, y, Threat("w2-linf", factor * delta), steps=steps, loss=loss, batch_size=500,
                    compute=compute)
        out["clean"] = accuracy(round(res.clean_accuracy * n), n)
        out[name] = {**accuracy(round(res.robust_accuracy * n), n), "converged": res.converged}
    out["w2"] = min((out[name] for name, *_, factor in ATTACKS if factor == 1.0), key=lambda a: a["accuracy"])
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run(datasets: list[str], seeds: list[int], methods: list[str], screen: list[str], test_examples: int,
        data_dir: Path, epochs: int | None = None, train: int | None = None) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    choices: dict[str, str | None] = {}
    for name in datasets:
        setup = dict(SETUPS[name])
        if epochs is not None:
            setup["epochs"] = epochs
        if train is not None:
            setup["train"], setup["validation"] = train, min(setup["validation"], max(50, train // 4))
            setup["screen"] = min(setup["screen"], max(50, train // 4))
        data = load_dataset(name, data_dir=data_dir)
        splits = make_splits(setup, data, test_examples)
        c, h, w = data.image_shape
        # a new network of this data set's shape (bound now: the loop goes on to the next data set)
        fresh = functools.partial(create_model, "small-cnn", num_classes=data.num_classes, in_channels=c,
                                  image_size=(h, w), dataset=name)

        mine: list[dict[str, Any]] = []
        states: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        everything = methods + [m for m in screen if m not in methods]
        for s_i, seed in enumerate(seeds):
            torch.manual_seed(seed)
            n_available = int(splits.finetune.train_y.shape[0])
            base = train_standard(fresh(), splits.finetune, epochs=setup["pretrain_epochs"], seed=seed)
            base_state = {k: v.clone() for k, v in base.state_dict().items()}
            order = everything[s_i % len(everything):] + everything[:s_i % len(everything)]   # rotate per seed
            for method in order:
                model = fresh()
                model.load_state_dict(base_state)
                clock = TrainClock()
                t0 = time.perf_counter()
                result = finetune(_config(setup, METHODS[method], seed, n_available), model, splits.finetune,
                                  hooks=clock, device="cpu")
                job_seconds = time.perf_counter() - t0
                states[(seed, method)] = result.best_model_state
                row: dict[str, Any] = {"dataset": name, "seed": seed, "method": method, "train_seconds": clock.seconds,
                       "job_seconds": job_seconds, "best_epoch": result.best_epoch,
                       "screen": attack(result.best_model_state, fresh(), splits.screen, setup["delta"]),
                       "passes_per_image_per_step": int(METHODS[method]["attack_steps"]) + 1,
                       "config": {k: result.config[k] for k in ("epochs", "batch_size", "lr", "beta", "attack_steps",
                                                                "attack_step_ratio", "attack_schedule",
                                                                "attack_overshoot")}}
                mine.append(row)
                print(f"{name:14s} seed {seed} {method:16s} train {clock.seconds:7.1f} s  job {job_seconds:7.1f} s  "
                      f"screen W2 {row['screen']['w2']['accuracy']:.3f}", flush=True)
        choices[name] = choose(mine, screen)
        final = methods + ([choices[name]] if choices[name] and choices[name] not in methods else [])
        for row in mine:            # the test images: once, for the final table
            if row["method"] in final:
                row["test"] = attack(states[(row["seed"], row["method"])], fresh(), splits.test, setup["delta"])
        runs += mine
    return {"runs": runs, "screen_choice": choices, "screen": screen_summary(runs, screen),
            "summary": summarize(runs), "attacks": [list(a) for a in ATTACKS]}


def _difference(rows: list[dict[str, Any]], part: str, method: str) -> list[float]:
    """Per seed: `method`'s W2 minus the baseline's, on the `part` images."""
    base = {r["seed"]: r[part]["w2"]["accuracy"] for r in rows if r["method"] == BASELINE and part in r}
    return [r[part]["w2"]["accuracy"] - base[r["seed"]] for r in rows if r["method"] == method and part in r]


def choose(rows: list[dict[str, Any]], candidates: list[str]) -> str | None:
    """The screen's choice: the largest worst-seed W2 difference to K = 10 on the screen images,
    then the largest median (never the test images)."""
    if not candidates:
        return None
    return max(candidates, key=lambda m: (min(_difference(rows, "screen", m)),
                                          statistics.median(_difference(rows, "screen", m))))


def screen_summary(runs: list[dict[str, Any]], candidates: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["dataset"] for r in runs):
        rows = [r for r in runs if r["dataset"] == name]
        for method in [BASELINE, *[m for m in candidates if m != BASELINE]]:
            mine = [r for r in rows if r["method"] == method]
            out.append({"dataset": name, "method": method, "n": mine[0]["screen"]["w2"]["n"],
                        "w2_robust_accuracy": _spread([r["screen"]["w2"]["accuracy"] for r in mine]),
                        "w2_difference_vs_k10": [round(d, 4) for d in _difference(rows, "screen", method)]})
    return out


def _median_run(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` accuracy on the test images is the median (the lower one of an even count)."""
    ordered = sorted(rows, key=lambda r: r["test"][key]["accuracy"])
    return ordered[(len(ordered) - 1) // 2]["test"][key]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["dataset"] for r in runs):
        rows = [r for r in runs if r["dataset"] == name and "test" in r]
        base_seconds = {r["seed"]: r["train_seconds"] for r in rows if r["method"] == BASELINE}
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            summary.append({
                "dataset": name, "method": method, "seeds": len(mine),
                "passes_per_image_per_step": mine[0]["passes_per_image_per_step"],
                "epochs": mine[0]["config"]["epochs"],
                "train_seconds": _spread([r["train_seconds"] for r in mine]),
                "job_seconds": _spread([r["job_seconds"] for r in mine]),
                "speedup_vs_k10": _spread([base_seconds[r["seed"]] / r["train_seconds"] for r in mine]),
                "n": mine[0]["test"]["w2"]["n"],
                **{key: {**_spread([r["test"][key]["accuracy"] for r in mine]), "median_run": _median_run(mine, key)}
                   for key in ("clean", "w2", *(a[0] for a in ATTACKS))},
                "w2_difference_vs_k10": _spread(_difference(rows, "test", method)),
            })
    return summary


def _with_interval(stat: dict[str, Any]) -> str:
    """The median seed's accuracy and its interval (with an even number of seeds, the lower middle run)."""
    run = stat["median_run"]
    return f"{run['accuracy']:.3f} [{run['ci95'][0]:.3f}, {run['ci95'][1]:.3f}]"


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| data set | method | epochs | passes/image/step | train s | job s | speed-up vs K=10 min / median / max "
             "| n | W2 ReDLR-50 δ | W2 CE-200 δ | W2 ReDLR-50 2δ | W2 diff. vs K=10 min / median / max |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        sp, d = s["speedup_vs_k10"], s["w2_difference_vs_k10"]
        lines.append(f"| {s['dataset']} | {s['method']} | {s['epochs']} | {s['passes_per_image_per_step']} "
                     f"| {s['train_seconds']['median']:.1f} | {s['job_seconds']['median']:.1f} "
                     f"| {sp['min']:.2f}× / {sp['median']:.2f}× / {sp['max']:.2f}× | {s['n']} "
                     f"| {_with_interval(s['redlr'])} | {_with_interval(s['ce'])} "
                     f"| {_with_interval(s['redlr_2delta'])} "
                     f"| {d['min']:+.3f} / {d['median']:+.3f} / {d['max']:+.3f} |")
    return "\n".join(lines)


def screen_table(screen: list[dict[str, Any]], choices: dict[str, str | None]) -> str:
    lines = ["| data set | method | n (screen) | W2 min / median / max | W2 diff. vs K=10 per seed | chosen |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in screen:
        w = s["w2_robust_accuracy"]
        diffs = " / ".join(f"{d * 100:+.1f}" for d in s["w2_difference_vs_k10"])
        lines.append(f"| {s['dataset']} | {s['method']} | {s['n']} | {w['min']:.3f} / {w['median']:.3f} / "
                     f"{w['max']:.3f} | {diffs} | {'yes' if choices.get(s['dataset']) == s['method'] else ''} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="fashion-mnist,digits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"in the final table, whatever the screen says; from {', '.join(METHODS)}")
    p.add_argument("--screen", default="", help="candidates; the screen images choose one for the final table")
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("ROBUSTIFY_DATASETS_DIR", "/tmp/robustify-data")))
    p.add_argument("--quick", action="store_true", help="digits, one seed")
    p.add_argument("--epochs", type=int, help="override every data set's epochs (a smoke run)")
    p.add_argument("--train", type=int, help="override every data set's training images (a smoke run)")
    p.add_argument("--out", type=Path, help="write the JSON here")
    args = p.parse_args()
    datasets = ["digits"] if args.quick else [d.strip() for d in args.datasets.split(",")]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    screen = [m.strip() for m in args.screen.split(",") if m.strip()]
    unknown = [m for m in methods + screen if m not in METHODS] + [d for d in datasets if d not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown method or data set: {', '.join(unknown)}")
    if BASELINE not in methods:
        raise SystemExit(f"--methods must include the baseline {BASELINE}")
    methods = [BASELINE, *[m for m in methods if m != BASELINE]]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    out = run(datasets, seeds, methods, screen, args.test_examples, args.data_dir, args.epochs, args.train)
    out["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    out["command_seconds"] = time.perf_counter() - t0
    if screen:
        print(screen_table(out["screen"], out["screen_choice"]))
    print(table(out["summary"]))
    print(f"total {out['command_seconds']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
