"""The final evaluation of one fine-tune with and without the input model's measurement read back.

    OMP_NUM_THREADS=1 python bench/measurement_cache.py --repeats 2           # digits
    OMP_NUM_THREADS=1 python bench/measurement_cache.py --corruptions --repeats 2
    python bench/measurement_cache.py --device cuda --dataset cifar10 ...     # on a GPU worker

What a sweep's later child saves (core.engine.cache): the README's job on digits (the zoo's small
CNN pre-trained with plain cross-entropy for 5 epochs, W-TRADES at W2-l∞ δ = 0.1, every field at
its default: 8 epochs, the standard preset on all 359 test images) is run `--repeats` times in
each of two ways, interleaved so that a change of machine load hits both alike: `miss` (an
empty MemoryCache: the input model and the checkpoint are measured, and the input's measurement
is stored) and `hit` (the cache the miss filled: only the checkpoint is measured, its audit and
the transfer check as always). The final evaluation is timed from its
first progress report ("test: …") to the return of `finetune`. Every hit must give the miss's
numbers exactly (before, after, paired intervals), or the script fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.engine.cache import MemoryCache
from core.engine.config import FinetuneConfig
from core.engine.data.datasets import load_dataset
from core.engine.hooks import Hooks
from core.engine.recipes.finetune import FinetuneResult, finetune
from core.engine.recipes.standard import train_standard
from core.engine.zoo import create_model


def timed(config: FinetuneConfig, model: torch.nn.Module, data: Any, device: str,
          cache: MemoryCache) -> tuple[float, float, FinetuneResult]:
    """(seconds of the final evaluation, of the whole run, the result)."""
    marks: list[float] = []

    def progress(fraction: float, phase: str, info: dict[str, Any]) -> None:
        if phase.startswith("test:") and not marks:
            marks.append(time.perf_counter())

    start = time.perf_counter()
    result = finetune(config, copy.deepcopy(model), data, Hooks(progress=progress), device=device, cache=cache)
    end = time.perf_counter()
    return end - marks[0], end - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--architecture", default="small-cnn")
    parser.add_argument("--pretrain", type=int, default=5, help="epochs of plain cross-entropy for the input model")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--test-examples", type=int, default=None)
    parser.add_argument("--evaluation", default="standard", choices=["standard", "quick"])
    parser.add_argument("--corruptions", action="store_true", help="with every corruption type at severities 1-5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the timings as JSON here")
    args = parser.parse_args()

    data = load_dataset(args.dataset, data_dir=args.data_dir or tempfile.mkdtemp())
    c, h, w = data.image_shape
    torch.manual_seed(0)
    model = train_standard(create_model(args.architecture, num_classes=data.num_classes, in_channels=c,
                                        image_size=(h, w), dataset=args.dataset), data, epochs=args.pretrain, seed=0,
                           device=args.device).cpu()
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": args.delta}, epochs=args.epochs,
                            evaluation=args.evaluation, test_examples=args.test_examples,
                            corruptions=True if args.corruptions else None)
    rows: dict[str, list[float]] = {"miss": [], "hit": []}
    for r in range(args.repeats):
        cache = MemoryCache()
        miss = timed(config, model, data, args.device, cache)
        hit = timed(config, model, data, args.device, cache)
        assert cache.hits >= 1 and hit[2].provenance["reused"]["before"], "the second run did not hit"
        same = (hit[2].before == miss[2].before and hit[2].after == miss[2].after
                and hit[2].change_ci95 == miss[2].change_ci95)
        assert same, "a hit changed the numbers"
        for name, (final, whole, _) in zip(("miss", "hit"), (miss, hit), strict=True):
            rows[name].append(final)
            print(f"repeat {r}: {name}: final evaluation {final:.1f} s of a {whole:.1f} s run "
                  f"(best epoch {miss[2].best_epoch})", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"median final evaluation: miss {med['miss']:.1f} s, hit {med['hit']:.1f} s, "
          f"ratio {med['miss'] / med['hit']:.2f}x")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seconds": rows,
                                        "median": med, "machine": platform.processor() or platform.machine(),
                                        "torch": torch.__version__,
                                        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
                                       indent=2))


if __name__ == "__main__":
    main()
