"""`robustify reproduce`: the 2025 paper's experiment on RobustBench CIFAR-10 l∞ models, our numbers
next to the paper's (clean, W2 and l∞ robust accuracy at δ = 8/255, before and after W-TRADES).

Offline only: CIFAR-10 in torchvision's format under --data-dir (cifar-10-batches-py/) and each
model's RobustBench file at --model-dir/cifar10/Linf/<name>.pt. Nothing is downloaded. The
protocol and the paper's table live in core/engine/recipes/reproduce.py; docs/reproduce.md explains both.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.params import CONTEXT, Failure
from core.engine.recipes.reproduce import PAPER_TABLE, PROTOCOL, QUICK


@click.command(context_settings=CONTEXT)
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder holding cifar-10-batches-py/ (default: ROBUSTIFY_DATASETS_DIR).")
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False),
              help="RobustBench's model folder, holding cifar10/Linf/<name>.pt (default: ROBUSTIFY_MODEL_DIR).")
@click.option("--models", help="Comma-separated RobustBench CIFAR-10 Linf names (default: the paper's models with "
                               f"known numbers: {', '.join(PAPER_TABLE)}); any other RobustBench model runs too, "
                               "with the paper's cells n/a.")
@click.option("--n-examples", type=int, help=f"Test images measured (default {PROTOCOL['n_examples']}).")
@click.option("--train-examples", type=int, help="Fine-tune on the first N training images (default: all).")
@click.option("--epochs", type=int, help=f"Fine-tuning epochs (default {PROTOCOL['epochs']}).")
@click.option("--batch-size", type=int, help=f"Training batch (default {PROTOCOL['batch_size']}).")
@click.option("--lr", type=float, help=f"Learning rate (default {PROTOCOL['lr']}).")
@click.option("--attack-steps", type=int, help=f"Inner W-PGD steps K (default {PROTOCOL['attack_steps']}).")
@click.option("--wpgd-steps", type=int, help=f"W-PGD steps of the measurement (default {PROTOCOL['wpgd_steps']}).")
@click.option("--pgd-steps", type=int, help=f"l∞ PGD steps of the measurement (default {PROTOCOL['pgd_steps']}).")
@click.option("--skip-finetune", is_flag=True, help="Only measure the models as published.")
@click.option("--quick", is_flag=True, help="A smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
              + " (options given explicitly win).")
@click.option("--device", help="cpu, cuda, cuda:1 (default: cuda when available).")
@click.option("--seed", type=int, help="Seed of the split, the augmentation and the attacks (default 0).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Also write the result as JSON here.")
def reproduce(data_dir: Path | None, model_dir: Path | None, models: str | None, n_examples: int | None,
              train_examples: int | None, epochs: int | None, batch_size: int | None, lr: float | None,
              attack_steps: int | None, wpgd_steps: int | None, pgd_steps: int | None, skip_finetune: bool,
              quick: bool, device: str | None, seed: int | None, out: Path | None) -> int:
    """The 2025 paper's table: RobustBench CIFAR-10 models before and after W-TRADES, ours next to
    the paper's numbers (offline: local CIFAR-10 and RobustBench weights, nothing downloaded)."""
    from core.engine.recipes.reproduce import ReproduceOptions, format_table
    from core.engine.recipes.reproduce import reproduce as run_protocol
    from core.errors import RobustifyError
    from core.service.settings import get_settings

    settings = get_settings()
    names = tuple(m.strip() for m in models.split(",") if m.strip()) if models else None
    try:
        options = ReproduceOptions.create(
            quick=quick, data_dir=data_dir or settings.resolved_datasets_dir,
            model_dir=model_dir or settings.resolved_model_dir, models=names, n_examples=n_examples,
            train_examples=train_examples, epochs=epochs, batch_size=batch_size, lr=lr, attack_steps=attack_steps,
            wpgd_steps=wpgd_steps, pgd_steps=pgd_steps, skip_finetune=skip_finetune or None, device=device,
            seed=seed)
        result = run_protocol(options, progress=lambda message: print(message, file=sys.stderr, flush=True))
    except RobustifyError as exc:
        raise Failure(exc.message, code=exc.code) from None
    click.echo(format_table(result))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {out}")
    return 0
