"""`robustify finetune` and `robustify evaluate`: the engine on this machine, no server.

Writes into --out: checkpoints/epoch_N.safetensors, best.safetensors, last.safetensors,
training_state.safetensors (for --resume), report.json and report.png. When no fine-tuned
epoch beats the input, best.safetensors is the input model (a byte copy of --model).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, TypeVar

import click

from cli.params import CONTEXT, THREAT_KINDS, JsonObject, Numbers, Radius, recipe_fields, require
from cli.progress import JobProgress, progress_options, resolve_mode
from cli.result_table import evaluation_table, finetune_table
from core.engine.config import EvaluateConfig, FinetuneConfig
from core.service.settings import get_settings

RecipeConfig = TypeVar("RecipeConfig", FinetuneConfig, EvaluateConfig)


def _settings() -> Any:
    return get_settings()


def _model_options(command: str) -> Any:
    """The options of `finetune` and `evaluate` (the ones that only make sense for one of them
    are only on that one)."""
    def wrap(f: Any) -> Any:
        opts = [
            click.option("--model", type=click.Path(path_type=Path, dir_okay=False),
                         help="The model to start from: a safetensors state dict (pickle files are refused)."),
            click.option("--architecture", default="small-cnn", show_default=True,
                         help="Its architecture: a built-in (small-cnn, preact-resnet-18, wide-resnet-28-10, …), "
                              "timm:<name>, torchvision:<name> or robustbench:<name>."),
            click.option("--robustbench", metavar="NAME",
                         help="A RobustBench model instead of --model, e.g. Wang2023Better_WRN-28-10."),
            click.option("--robustbench-threat-model", "--robustbench-threat", "robustbench_threat_model",
                         type=click.Choice(["Linf", "L2", "corruptions"]), default="Linf", show_default=True,
                         help="The RobustBench leaderboard the --robustbench model is from."),
            click.option("--input-mean", "--mean", "input_mean", type=Numbers("float"),
                         help="Per-channel mean the model normalises its input with, e.g. 0.485,0.456,0.406 "
                              "(default: none, the model takes [0, 1] pixels)."),
            click.option("--input-std", "--std", "input_std", type=Numbers("float"),
                         help="Per-channel std that goes with --input-mean, e.g. 0.229,0.224,0.225."),
            click.option("--dataset", default="digits", show_default=True,
                         help="digits, fashion-mnist, cifar10, cifar100, or an .npz file (x uint8 images, y labels)."),
            click.option("--out", type=click.Path(path_type=Path, file_okay=False),
                         help="Output folder (created if missing).  [required]"),
            click.option("--config", type=JsonObject(),
                         help=f"Recipe fields as a JSON object, inline or in a file (@file.json); "
                              f"`robustify jobs fields {command}` lists them."),
            click.option("--set", "assignments", multiple=True, metavar="FIELD=VALUE",
                         help="One recipe field (repeatable; wins over --config), e.g. --set epochs=3. "
                              "VALUE is JSON or a fraction (8/255); `--set help` lists the fields."),
            click.option("--threat-model", type=click.Choice(THREAT_KINDS),
                         help="The threat model's kind: a W2 ball with l-inf or l2 ground cost, or a pointwise "
                              "ball (default w2-linf)."),
            click.option("--delta", type=Radius(),
                         help="The radius δ, a number or a fraction (8/255); default 8/255 for l-inf costs, "
                              "0.5 for l2."),
            click.option("--seed", type=int, help="Seed of the recipe (data order, attack starts)."),
            click.option("--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
            click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False),
                         default=lambda: _settings().resolved_datasets_dir, show_default="ROBUSTIFY_DATASETS_DIR",
                         help="Where the built-in data sets are kept."),
            click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False),
                         default=lambda: _settings().resolved_model_dir, show_default="ROBUSTIFY_MODEL_DIR",
                         help="Where RobustBench weights are kept."),
            click.option("--allow-download/--no-allow-download", default=lambda: _settings().allow_download,
                         show_default="ROBUSTIFY_ALLOW_DOWNLOAD",
                         help="Download missing data sets and RobustBench weights."),
        ]
        if command == "finetune":
            opts += [
                click.option("--pretrain", type=click.IntRange(min=0), default=0, metavar="EPOCHS",
                             help="Without --model: train --architecture normally for EPOCHS first."),
                click.option("--pretrain-seed", type=int, default=0, show_default=True,
                             help="Seed of that pre-training; --seed never changes the starting model."),
                click.option("--resume", type=click.Path(path_type=Path, dir_okay=False, exists=True),
                             help="training_state.safetensors of an interrupted run, to continue it."),
            ]
        else:
            opts += [
                click.option("--evaluation", type=click.Choice(["standard", "quick"]),
                             help="The attack preset (default standard: the W2 ensemble run to convergence and "
                                  "AutoAttack / APGD; quick: cheaper, for a first look)."),
                click.option("--deltas", type=Numbers("radius"),
                             help="Several radii for a robustness curve, e.g. 2/255,8/255,0.1 "
                                  "(default: the threat model's δ)."),
                click.option("--linf-attacks", "--attacks", "linf_attacks",
                             type=click.Choice(["pgd", "apgd", "autoattack"]), multiple=True,
                             help="Pointwise attacks (repeatable; default the preset's: autoattack on a GPU, "
                                  "apgd = APGD-CE + APGD-T on a CPU, pgd for quick)."),
            ]
        f = progress_options(f)          # listed last
        for opt in reversed(opts):
            f = opt(f)
        return f

    return wrap


def _config(args: argparse.Namespace, cls: type[RecipeConfig]) -> RecipeConfig:
    recipe = "finetune" if cls is FinetuneConfig else "evaluate"
    fields = recipe_fields(args.config, tuple(args.assignments), recipe)
    threat = dict(fields.get("threat_model") or {})
    if args.threat_model:
        threat["kind"] = args.threat_model
    if args.delta is not None:
        threat["delta"] = args.delta
    if threat:
        fields["threat_model"] = threat
    if args.seed is not None:
        fields["seed"] = args.seed
    if cls is EvaluateConfig:
        if args.deltas:
            fields["deltas"] = args.deltas
        if args.linf_attacks:
            fields["linf_attacks"] = list(args.linf_attacks)
        if args.evaluation:
            fields["evaluation"] = args.evaluation
    return cls.model_validate(fields)


def _load(args: argparse.Namespace):
    from core.engine.data.datasets import load_dataset
    from core.engine.zoo import create_model, load_model_file, load_robustbench_model, with_pixel_input

    data = load_dataset(args.dataset, data_dir=args.data_dir, allow_download=args.allow_download)
    c, h, w = data.image_shape
    if args.robustbench:
        model = load_robustbench_model(args.robustbench, dataset=args.dataset,
                                       threat_model=args.robustbench_threat_model, model_dir=args.model_dir,
                                       allow_download=args.allow_download)
    elif args.model:
        model = load_model_file(args.model, args.architecture, num_classes=data.num_classes, in_channels=c,
                                image_size=(h, w), dataset=args.dataset, input_mean=args.input_mean,
                                input_std=args.input_std)
    elif getattr(args, "pretrain", 0) > 0:
        import torch

        from core.engine.recipes.standard import accuracy, train_standard

        # its own seed: runs that differ only in --seed start from the same weights
        torch.manual_seed(args.pretrain_seed)
        model = with_pixel_input(create_model(args.architecture, num_classes=data.num_classes, in_channels=c,
                                              image_size=(h, w), dataset=args.dataset), args.input_mean, args.input_std)
        print(f"pre-training {args.architecture} on {args.dataset} for {args.pretrain} epochs (plain CE, "
              f"seed {args.pretrain_seed})...")
        model = train_standard(model, data, epochs=args.pretrain, seed=args.pretrain_seed, device=args.device)
        print(f"clean test accuracy after pre-training: {accuracy(model, data):.4f}")
    else:
        raise click.UsageError("give --model FILE.safetensors or --robustbench NAME"
                               + (", or --pretrain EPOCHS" if hasattr(args, "pretrain") else ""))
    return model, data


class _Progress:
    """The recipe's hooks shown the way a job's progress is (cli.progress): a bar on a terminal,
    a line per phase or epoch in a log, or nothing; with the ETA the worker would report."""

    def __init__(self, args: argparse.Namespace) -> None:
        from core.engine.hooks import Eta

        self.shown = JobProgress(resolve_mode(args.progress_mode, args.quiet, sys.stdout))
        self.eta = Eta()
        self.job: dict[str, Any] = {"status": "running", "progress": {}, "latest_metrics": {}}

    def __call__(self, fraction: float, phase: str, metrics: dict[str, Any]) -> None:
        where = {k: metrics[k] for k in ("epoch", "total_epochs", "step", "total_steps") if k in metrics}
        self.job["progress"] = {"fraction": fraction, "phase": phase, "eta_seconds": self.eta(fraction), **where}
        self.job["latest_metrics"].update({k: v for k, v in metrics.items() if isinstance(v, float)})
        self.shown.update(self.job)

    def event(self, type: str, message: str, data: dict[str, Any]) -> None:
        """A recipe's event (e.g. a batch halved after a CUDA out-of-memory error), above the bar."""
        self.shown.write(f"{type}: {message}")

    def warn(self, message: str, data: dict[str, Any]) -> None:
        self.shown.write(f"warning: {message}")

    def close(self) -> None:
        self.shown.close()


def run_finetune(args: argparse.Namespace) -> int:
    from core.engine.checkpoint import load_training_checkpoint, save_weights
    from core.engine.hooks import Hooks
    from core.engine.recipes.finetune import finetune

    config = _config(args, FinetuneConfig)   # `--set help` lists the fields and ends here
    out: Path = require(out=args.out)[0]
    model, data = _load(args)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    def on_checkpoint(ckpt) -> None:
        save_weights(ckpt.model_state, out / "checkpoints" / f"epoch_{ckpt.epoch}.safetensors",
                     metadata={"epoch": str(ckpt.epoch)})
        ckpt.save(out / "training_state.safetensors")

    resume = load_training_checkpoint(args.resume) if args.resume else None
    bar = _Progress(args)
    try:
        result = finetune(config, model, data, Hooks(progress=bar, checkpoint=on_checkpoint, event=bar.event,
                                                     warn=bar.warn),
                          device=args.device, resume=resume, context=_context(args))
    finally:
        bar.close()
    if result.best_epoch == 0 and args.model:
        shutil.copyfile(args.model, out / "best.safetensors")   # the input itself, byte for byte
    else:
        save_weights(result.best_model_state, out / "best.safetensors", metadata={"epoch": str(result.best_epoch)})
    save_weights(result.last_model_state, out / "last.safetensors")
    (out / "report.json").write_text(json.dumps(result.report, indent=2))
    (out / "report.png").write_bytes(result.plot_png())
    print(finetune_table(result.summary))
    print(f"wrote {out}/best.safetensors, last.safetensors, report.json, report.png")
    return 0


def _context(args: argparse.Namespace) -> dict[str, Any]:
    """What the report's provenance says about the inputs of a local run."""
    context: dict[str, Any] = {"dataset": args.dataset}
    if args.model:
        context.update(model_file=str(args.model), model_sha256=hashlib.sha256(args.model.read_bytes()).hexdigest())
    elif args.robustbench:
        context["model"] = f"robustbench:{args.robustbench}"
    else:
        context["model"] = (f"{args.architecture} pre-trained for {args.pretrain} epochs "
                            f"(seed {args.pretrain_seed})")
    return context


def run_evaluate(args: argparse.Namespace) -> int:
    from core.engine.hooks import Hooks
    from core.engine.recipes.evaluate import evaluate

    config = _config(args, EvaluateConfig)   # `--set help` lists the fields and ends here
    require(out=args.out)
    model, data = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    bar = _Progress(args)
    try:
        report = evaluate(config, model, data, Hooks(progress=bar, event=bar.event, warn=bar.warn),
                          device=args.device, context=_context(args))
    finally:
        bar.close()
    (args.out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    (args.out / "report.png").write_bytes(report.plot_png())
    for row in report.w2:
        print(f"W2 ({row['threat']}) δ={row['delta']:.4f}: robust accuracy {row['robust_accuracy']:.4f} "
              f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}] (ratio {row['robust_to_clean_ratio']:.4f}, "
              f"{row['attack']}), Υ={row.get('sensitivity', float('nan')):.4g}")
    for row in report.pointwise:
        print(f"{row['attack']} {row.get('threat', '')} δ={row['delta']:.4f}: robust accuracy "
              f"{row['robust_accuracy']:.4f} [{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}] "
              f"(ratio {row['robust_to_clean_ratio']:.4f})")
    print(evaluation_table(report.summary, report.warnings, report.to_dict()))
    print(f"wrote {args.out}/report.json and report.png")
    return 0


def namespace(command: str, argv: list[str]) -> argparse.Namespace:
    """The parsed options of `robustify <command> argv` as attributes (what _load and _config read)."""
    cmd = finetune if command == "finetune" else evaluate
    with cmd.make_context(command, list(argv)) as ctx:
        return argparse.Namespace(**ctx.params)


@click.command(context_settings=CONTEXT)
@_model_options("finetune")
def finetune(**options: Any) -> int:
    """W-TRADES fine-tuning of a model on this machine (no server).

    \b
    Writes into --out: checkpoints/epoch_N.safetensors, best.safetensors, last.safetensors,
    training_state.safetensors (for --resume), report.json and report.png. When no fine-tuned
    epoch beats the input, best.safetensors is the input model (a byte copy of --model).

    \b
    Example:
      robustify finetune --architecture small-cnn --dataset digits --pretrain 5 \\
          --delta 0.1 --set epochs=3 --out out/ft
    """
    return run_finetune(argparse.Namespace(**options))


@click.command(context_settings=CONTEXT)
@_model_options("evaluate")
def evaluate(**options: Any) -> int:
    """Clean, W2 and l-inf robust accuracy of a model on this machine (no server).

    \b
    Writes report.json and report.png into --out and prints one line per radius and attack, each
    with its 95 % interval, then the headline with the attacks behind it and the masking audit.

    \b
    Example:
      robustify evaluate --model out/ft/best.safetensors --architecture small-cnn \\
          --dataset digits --deltas 2/255,8/255,0.1 --out out/eval
    """
    return run_evaluate(argparse.Namespace(**options))
