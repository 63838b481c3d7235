"""What APGD-T's last six target classes find on a CPU: the standard version's 9 targets against the top 3.

    OMP_NUM_THREADS=1 python bench/apgd_targets.py                          # digits and Fashion-MNIST, seeds 0 1 2
    OMP_NUM_THREADS=1 python bench/apgd_targets.py --datasets digits --seeds 0

APGD-T attacks the highest-scoring wrong classes in turn, 100 steps each, on the points still
robust, so with 9 targets it costs several times APGD-CE; on a CPU it is about half of a default
digits fine-tune (the before/after's pointwise attack, docs/runtimes.md). Every report uses 9. This
measures what the last 6 add, for a decision made with numbers.

Per data set and seed: small-cnn trained normally for 5 epochs ("before") and fine-tuned from it
with W-TRADES (the allocate schedule, 8 epochs on digits, 4 on Fashion-MNIST; "after", left out
when no epoch beat the input), both on the training split less a stratified sample of withheld
training images (the screen: digits 300, Fashion-MNIST 500; the Fashion-MNIST models train on
3,000 images) that no model trains on. The screen is attacked in the
l∞ ball (digits δ = 0.1, the demo's; Fashion-MNIST 8/255) by APGD-CE, then APGD-T with 9 targets,
and again with the top 3. Printed per model: n, clean accuracy, robust accuracy after APGD-CE,
after APGD-T with 9 and with 3 targets, the images that only the 9-target run broke and those that
only the 3-target run broke (its random starts differ), and the seconds of each run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import torch

from core.engine.api import finetune
from core.engine.attacks.autoattack import autoattack
from core.engine.data.datasets import ImageData, load_dataset
from core.engine.data.npz import stratified_split
from core.engine.recipes.standard import train_standard
from core.engine.threats import Threat
from core.engine.zoo import create_model

DATA_DIR = "/tmp/robustify-bench-data"
SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"screen": 300, "train": None, "delta": 0.1, "size": 8, "epochs": 8},
    "fashion-mnist": {"screen": 500, "train": 3000, "delta": 8 / 255, "size": 28, "epochs": 4},
}


def models(name: str, data: ImageData, seed: int) -> tuple[dict[str, torch.nn.Module], torch.Tensor, torch.Tensor]:
    """The before and after models of `seed`, and the screen's images (float in [0, 1]) and labels."""
    s = SETTINGS[name]
    keep, screen = stratified_split(data.train_y.numpy(), test_fraction=s["screen"] / len(data.train_y), seed=seed)
    keep = keep[: s["train"]] if s["train"] else keep
    train = dataclasses.replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])
    torch.manual_seed(seed)
    before = create_model("small-cnn", num_classes=10, in_channels=1, image_size=s["size"], dataset=name)
    before = train_standard(before, train, epochs=5, seed=seed).eval()
    tuned = finetune(before, (train.train_x.float().div(255), train.train_y), delta=s["delta"], epochs=s["epochs"],
                     attack_schedule="allocate", evaluation="quick", test_examples=200, seed=seed)
    nets = {"before": before}
    if tuned.report["best_epoch"] > 0:     # else the fine-tune handed the input back: one model, attacked once
        nets["after"] = tuned.model.eval()
    return nets, data.train_x[screen].float().div(255), data.train_y[screen]


def attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, delta: float, seed: int) -> dict[str, Any]:
    threat = Threat("linf", delta)
    runs = {}
    for k in (9, 3):
        t0 = time.perf_counter()
        runs[k] = (autoattack(model, x, y, threat, seed=seed, attacks=("apgd-ce", "apgd-t"), target_classes=k),
                   time.perf_counter() - t0)
    (nine, nine_s), (three, three_s) = runs[9], runs[3]
    nine_ok, three_ok = nine.correct, three.correct
    assert nine_ok is not None and three_ok is not None
    return {"n": int(x.shape[0]), "clean": round(nine.clean_accuracy, 4),
            "after_apgd_ce": round(nine.accuracy_after["apgd-ce"], 4),
            "targets_9": round(nine.robust_accuracy, 4), "targets_3": round(three.robust_accuracy, 4),
            "only_9_broke": int((three_ok & ~nine_ok).sum()), "only_3_broke": int((nine_ok & ~three_ok).sum()),
            "seconds_9": round(nine_s, 1), "seconds_3": round(three_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.datasets:
        data = load_dataset(name, data_dir=DATA_DIR)
        for seed in args.seeds:
            nets, x, y = models(name, data, seed)
            for which, net in nets.items():
                rows.append({"dataset": name, "seed": seed, "model": which,
                             **attack(net, x, y, SETTINGS[name]["delta"], seed)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"images only the 9-target run broke: {sum(r['only_9_broke'] for r in rows)} of "
          f"{sum(r['n'] for r in rows)} attacked ({len(rows)} models); APGD-CE + APGD-T seconds: 9 targets "
          f"{sum(r['seconds_9'] for r in rows):.0f}, top 3 {sum(r['seconds_3'] for r in rows):.0f}")


if __name__ == "__main__":
    main()
