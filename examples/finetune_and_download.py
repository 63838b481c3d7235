"""Fine-tune a registered model with W-TRADES, follow it, and download the robust checkpoint and report.

    python examples/finetune_and_download.py --model mdl_…                 # digits, δ = 0.1, 8 epochs
    python examples/finetune_and_download.py --model mdl_… --dataset ds_… --delta 8/255 --epochs auto

Prints the job's progress (one line per phase and epoch), the before/after robust accuracies with
their 95 % intervals and the verdict, then saves the best checkpoint (sha256-verified), report.json
and report.png into --out. Needs only the SDK. Server: ROBUSTIFY_URL / ROBUSTIFY_API_KEY, or
--url / --api-key.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from robustify import Client, Job

# For smoke tests: a few seconds of W-TRADES on digits, measured with the cheap "quick" attacks on
# 100 test images. Its numbers say nothing about robustness.
QUICK: dict[str, Any] = {"epochs": 2, "batch_size": 96, "lr": 0.01, "beta": 3.0, "attack_steps": 3,
                         "validation_examples": 200, "eval_wpgd_steps": 5, "eval_pgd_steps": 3,
                         "test_wpgd_steps": 10, "test_pgd_steps": 3, "budget_subset": 256,
                         "evaluation": "quick", "test_examples": 100}


class Follow:
    """on_update for client.jobs.wait: a line whenever the phase or the epoch changes."""

    def __init__(self) -> None:
        self.last: tuple[Any, ...] = ()

    def __call__(self, job: Job) -> None:
        p = job.progress
        now = (job.status, p.phase if p else None, p.epoch if p else None)
        if now != self.last:
            self.last = now
            epoch = f" epoch {p.epoch}/{p.total_epochs}" if p and p.epoch is not None else ""
            fraction = f" {100 * p.fraction:.0f} %" if p and p.fraction is not None else ""
            print(f"{job.status}: {now[1] or ''}{epoch}{fraction}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a ready model's id (mdl_…)")
    parser.add_argument("--dataset", default="digits", help="a built-in data set or an uploaded one (ds_…)")
    parser.add_argument("--threat", default="w2-linf", choices=["w2-linf", "w2-l2", "linf", "l2"])
    parser.add_argument("--delta", default="0.1", help="the radius in [0, 1] pixels: 0.1, 8/255, ...")
    parser.add_argument("--epochs", default="8", help='a number, or "auto" (about 500 optimizer steps)')
    parser.add_argument("--out", default="robust", help="folder for the checkpoint and the report")
    parser.add_argument("--url")
    parser.add_argument("--api-key")
    parser.add_argument("--quick", action="store_true", help="a tiny recipe: for smoke tests")
    args = parser.parse_args()

    config: dict[str, Any] = dict(QUICK) if args.quick else {"epochs": args.epochs}
    with Client(args.url, api_key=args.api_key) as client:
        job = client.jobs.create(type="finetune", model_id=args.model, dataset=args.dataset,
                                 threat_model={"kind": args.threat, "delta": args.delta}, config=config)
        print(f"job {job.id} {job.status}: epochs {job.config.get('epochs')}, batch_size "
              f"{job.config.get('batch_size')}, lr {job.config.get('lr')} (resolved at submit)")
        job = client.jobs.wait(job.id, on_update=Follow())
        if not job.succeeded:
            raise SystemExit(f"job {job.id} {job.status}: {job.error}")

        outcome = job.outcome                              # every accuracy with its n and 95 % interval
        if outcome is None:
            raise SystemExit(f"job {job.id} succeeded without a result")
        ground = "linf" if args.threat.endswith("linf") else "l2"
        for key in ("clean_accuracy", "w2_robust_accuracy", f"{ground}_robust_accuracy"):
            before = outcome.before.accuracy(key) if outcome.before else None
            after = outcome.after.accuracy(key) if outcome.after else None
            if before is not None and after is not None:
                print(f"{key:>22}: {before}  ->  {after}")
        print(f"verdict: {outcome.verdict_words}")

        files = client.jobs.download(job.id, args.out)       # each file checked against its sha256
        print(f"saved {files.checkpoint}, {files.report}, {files.plot}")
        report = json.loads(files.report.read_text()) if files.report else {}
        print(f"best epoch {report.get('best_epoch')} of {report.get('epochs_completed')}; the checkpoint holds "
              "the architecture's own state dict (load it with load_state_dict)")


if __name__ == "__main__":
    main()
