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
from fractions import Fraction
from pathlib import Path
from typing import Any

import pydantic

from core.config import EvaluateConfig, FinetuneConfig
from core.errors import RobustifyError
from core.result_table import evaluation_table, finetune_table
from core.settings import get_settings


def _radius(text: str) -> float:
    """'8/255' or '0.031' → float."""
    return float(Fraction(text.strip())) if "/" in text else float(text)


def _floats(text: str) -> list[float]:
    """'0.485,0.456,0.406' → [0.485, 0.456, 0.406]."""
    return [float(v) for v in text.split(",") if v.strip()]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parser(command: str) -> argparse.ArgumentParser:
    settings = get_settings()
    p = argparse.ArgumentParser(prog=f"robustify {command}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model", type=Path, help="safetensors state dict of the model")
    src.add_argument("--architecture", default="small-cnn",
                     help="built-in architecture, timm:<name>, torchvision:<name> or robustbench:<name> "
                          "(default small-cnn)")
    src.add_argument("--robustbench", metavar="NAME", help="a RobustBench model ID instead of --model")
    src.add_argument("--robustbench-threat", default="Linf", help="RobustBench threat model (default Linf)")
    src.add_argument("--pretrain", type=int, default=0, metavar="EPOCHS",
                     help="without --model: train the architecture normally for EPOCHS first")
    src.add_argument("--mean", type=_floats, help="per-channel mean the model normalises its input with, e.g. "
                                                  "0.485,0.456,0.406 (default: none)")
    src.add_argument("--std", type=_floats, help="per-channel std, e.g. 0.229,0.224,0.225")
    src.add_argument("--pretrain-seed", type=int, default=0,
                     help="seed of the pre-training (default 0); --seed never changes the starting model")
    p.add_argument("--dataset", default="digits", help="cifar10 | cifar100 | fashion-mnist | digits | path.npz")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--config", type=Path, help="JSON file with recipe fields")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one recipe field (repeatable), e.g. --set epochs=3")
    p.add_argument("--threat", choices=["w2-linf", "w2-l2", "linf", "l2"], help="threat model kind")
    p.add_argument("--delta", type=_radius, help="radius δ, e.g. 8/255")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--data-dir", type=Path, default=settings.resolved_datasets_dir)
    p.add_argument("--model-dir", type=Path, default=settings.resolved_model_dir)
    p.add_argument("--allow-download", action="store_true", default=settings.allow_download)
    if command == "finetune":
        p.add_argument("--resume", type=Path, help="training_state.safetensors of an interrupted run")
    else:
        p.add_argument("--deltas", help="comma-separated radii for a curve, e.g. 2/255,4/255,8/255")
        p.add_argument("--attacks", help="pointwise attacks: pgd, autoattack or pgd,autoattack")
    return p


def _config(args: argparse.Namespace, cls: type) -> Any:
    fields: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        fields[key.strip()] = _value(value)
    threat = dict(fields.get("threat_model") or {})
    if args.threat:
        threat["kind"] = args.threat
    if args.delta is not None:
        threat["delta"] = args.delta
    if threat:
        fields["threat_model"] = threat
    if args.seed is not None:
        fields["seed"] = args.seed
    if cls is EvaluateConfig:
        if args.deltas:
            fields["deltas"] = [_radius(d) for d in args.deltas.split(",")]
        if args.attacks:
            fields["linf_attacks"] = [a.strip() for a in args.attacks.split(",")]
    return cls.model_validate(fields)


def _load(args: argparse.Namespace):
    from core.data import load_dataset
    from core.zoo import create_model, load_model_file, load_robustbench_model, with_pixel_input

    data = load_dataset(args.dataset, data_dir=args.data_dir, allow_download=args.allow_download)
    c, h, w = data.image_shape
    if args.robustbench:
        model = load_robustbench_model(args.robustbench, dataset=args.dataset, threat_model=args.robustbench_threat,
                                       model_dir=args.model_dir, allow_download=args.allow_download)
    elif args.model:
        model = load_model_file(args.model, args.architecture, num_classes=data.num_classes, in_channels=c,
                                image_size=(h, w), dataset=args.dataset, input_mean=args.mean, input_std=args.std)
    elif args.pretrain > 0:
        from core.recipes.standard import accuracy, train_standard

        import torch

        # its own seed: runs that differ only in --seed start from the same weights
        torch.manual_seed(args.pretrain_seed)
        model = with_pixel_input(create_model(args.architecture, num_classes=data.num_classes, in_channels=c,
                                              image_size=(h, w), dataset=args.dataset), args.mean, args.std)
        print(f"pre-training {args.architecture} on {args.dataset} for {args.pretrain} epochs (plain CE, "
              f"seed {args.pretrain_seed})...")
        model = train_standard(model, data, epochs=args.pretrain, seed=args.pretrain_seed, device=args.device)
        print(f"clean test accuracy after pre-training: {accuracy(model, data):.4f}")
    else:
        raise SystemExit("give --model FILE.safetensors, --robustbench NAME, or --pretrain EPOCHS")
    return model, data


class _Bar:
    """tqdm bar driven by the recipe's progress hook."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def __call__(self, fraction: float, phase: str, metrics: dict[str, Any]) -> None:
        self.bar.set_description(phase)
        shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in metrics.items()
                 if k in ("epoch", "step", "clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy",
                          "train_loss")}
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        self.bar.update(max(0, int(fraction * 1000) - self.bar.n))

    def event(self, type: str, message: str, data: dict[str, Any]) -> None:
        """A recipe's event (e.g. a batch halved after a CUDA out-of-memory error), above the bar."""
        self.bar.write(f"{type}: {message}")

    def warn(self, message: str, data: dict[str, Any]) -> None:
        self.bar.write(f"warning: {message}")

    def close(self) -> None:
        self.bar.close()


def run_finetune(args: argparse.Namespace) -> int:
    from core.checkpoint import load_training_checkpoint, save_weights
    from core.hooks import Hooks
    from core.recipes.finetune import finetune

    config = _config(args, FinetuneConfig)
    model, data = _load(args)
    out: Path = args.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    def on_checkpoint(ckpt) -> None:
        save_weights(ckpt.model_state, out / "checkpoints" / f"epoch_{ckpt.epoch}.safetensors",
                     metadata={"epoch": str(ckpt.epoch)})
        ckpt.save(out / "training_state.safetensors")

    resume = load_training_checkpoint(args.resume) if args.resume else None
    bar = _Bar()
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
    from core.hooks import Hooks
    from core.recipes.evaluate import evaluate

    config = _config(args, EvaluateConfig)
    model, data = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    bar = _Bar()
    try:
        report = evaluate(config, model, data, Hooks(progress=bar, event=bar.event, warn=bar.warn),
                          device=args.device, context=_context(args))
    finally:
        bar.close()
    (args.out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    (args.out / "report.png").write_bytes(report.plot_png())
    for row in report.w2:
        print(f"W2 ({row['threat']}) δ={row['delta']:.4f}: robust accuracy {row['robust_accuracy']:.4f} "
              f"(ratio {row['robust_to_clean_ratio']:.4f}), Υ={row['sensitivity']:.4g}, "
              f"loss max {row['loss_max']:.4f} vs first-order {row['first_order_estimate']:.4f}")
    for row in report.pointwise:
        print(f"{row['attack']} {row.get('threat', '')} δ={row['delta']:.4f}: robust accuracy "
              f"{row['robust_accuracy']:.4f} (ratio {row['robust_to_clean_ratio']:.4f})")
    print(evaluation_table(report.summary, report.warnings))
    print(f"wrote {args.out}/report.json and report.png")
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    args = _parser(command).parse_args(rest)
    try:
        return run_finetune(args) if command == "finetune" else run_evaluate(args)
    except RobustifyError as exc:
        print(f"robustify {command}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "config"
            print(f"robustify {command}: validation_error: {field}: {err['msg']}", file=sys.stderr)
        return 2
