"""`robustify reproduce`: the 2025 paper's experiment on RobustBench CIFAR-10 l∞ models, our numbers
next to the paper's (clean, W2 and l∞ robust accuracy at δ = 8/255, before and after W-TRADES).

Offline only: CIFAR-10 in torchvision's format under --data-dir (cifar-10-batches-py/) and each
model's RobustBench file at --model-dir/cifar10/Linf/<name>.pt. Nothing is downloaded. The
protocol and the paper's table live in core/reproduce.py; docs/reproduce.md explains both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import RobustifyError
from core.settings import get_settings


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from core.reproduce import PAPER_TABLE, PROTOCOL, QUICK

    settings = get_settings()
    p.add_argument("--data-dir", type=Path, default=settings.resolved_datasets_dir,
                   help="folder holding cifar-10-batches-py/ (default: ROBUSTIFY_DATASETS_DIR)")
    p.add_argument("--model-dir", type=Path, default=settings.resolved_model_dir,
                   help="RobustBench's model folder: <model-dir>/cifar10/Linf/<name>.pt")
    p.add_argument("--models", help="comma-separated RobustBench CIFAR-10 Linf names (default: the paper's "
                                    f"models with known numbers: {', '.join(PAPER_TABLE)}); any other "
                                    "single RobustBench model runs too, with the paper's cells n/a")
    p.add_argument("--n-examples", type=int, help=f"test images measured (default {PROTOCOL['n_examples']})")
    p.add_argument("--train-examples", type=int, help="fine-tune on the first N training images (default: all)")
    p.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default {PROTOCOL['epochs']})")
    p.add_argument("--batch-size", type=int, help=f"training batch (default {PROTOCOL['batch_size']})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {PROTOCOL['lr']})")
    p.add_argument("--attack-steps", type=int, help=f"inner W-PGD steps K (default {PROTOCOL['attack_steps']})")
    p.add_argument("--wpgd-steps", type=int,
                   help=f"W-PGD steps of the measurement (default {PROTOCOL['wpgd_steps']})")
    p.add_argument("--pgd-steps", type=int, help=f"l∞ PGD steps of the measurement (default {PROTOCOL['pgd_steps']})")
    p.add_argument("--skip-finetune", action="store_true", help="only measure the models as published")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                        + " (options given explicitly win)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=int, help="seed of the split, the augmentation and the attacks (default 0)")
    p.add_argument("--out", type=Path, help="also write the result as JSON to this file")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `reproduce` on a parent parser's subparsers; the parsed args carry func=run."""
    p = subparsers.add_parser("reproduce", help="the 2025 paper's table: RobustBench CIFAR-10 models, ours vs "
                                                "the paper's", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from core.reproduce import ReproduceOptions, format_table, reproduce

    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    try:
        options = ReproduceOptions.create(
            quick=args.quick, data_dir=args.data_dir, model_dir=args.model_dir, models=models,
            n_examples=args.n_examples, train_examples=args.train_examples, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, attack_steps=args.attack_steps, wpgd_steps=args.wpgd_steps,
            pgd_steps=args.pgd_steps, skip_finetune=args.skip_finetune or None, device=args.device, seed=args.seed)
        result = reproduce(options, progress=lambda message: print(message, file=sys.stderr, flush=True))
    except RobustifyError as exc:
        print(f"robustify reproduce: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str]) -> int:
    """`argv` as cli.main passes it: ["reproduce", options...]."""
    p = argparse.ArgumentParser(prog="robustify reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run(p.parse_args(argv[1:]))
