"""The 2025 paper's experiment, run locally: RobustBench CIFAR-10 l∞ models, measured before and
after W-TRADES fine-tuning, next to the numbers the paper reports.

Paper: X. Bai, G. He, Y. Jiang, J. Obłój, "Wasserstein distributional adversarial training for
deep neural networks", arXiv:2502.09352 (2025). Protocol (docs/reproduce.md): CIFAR-10's 50,000
original training images, threat W2 with l∞ ground cost at δ = 8/255, W-TRADES with the split
loss (ReDLR attack, CE + β·KL step) and the W-PGD-Budget batch radius, then clean accuracy, W2
robust accuracy (W-PGD-ReDLR) and l∞ robust accuracy (PGD) at δ = 8/255 on the test set.

Everything runs offline: CIFAR-10 must be in torchvision's on-disk format under the data folder
and each model's RobustBench weights file where RobustBench puts it; nothing is downloaded.
The weights are read by core.engine.zoo (torch.load with weights_only=True, never plain pickle).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DatasetUnavailable, ModelDownloadFailed, ValidationError

if TYPE_CHECKING:   # imported where used: the engine's modules load only when a run starts
    from core.engine.config import EvaluateConfig, FinetuneConfig
    from core.engine.hooks import Hooks

__all__ = [
    "PAPER", "PAPER_GAIN_RANGES", "PAPER_TABLE", "PROTOCOL", "QUICK", "ReproduceOptions", "check_inputs",
    "format_table", "reproduce",
]

DATASET = "cifar10"
THREAT_MODEL = "Linf"       # RobustBench's l∞ leaderboard
DELTA = 8 / 255

PAPER = {
    "reference": ("X. Bai, G. He, Y. Jiang, J. Obłój, \"Wasserstein distributional adversarial training for "
                  "deep neural networks\", arXiv:2502.09352 (2025)"),
    "url": "https://arxiv.org/abs/2502.09352",
    "models_in_paper": 5,
    "robust_figures": ("The paper's W2 and l∞ figures are read as the ratio A_δ/A of robust to clean accuracy "
                       "(after fine-tuning its l∞ figure, 90.64, exceeds the clean accuracy, 78.19, which a robust "
                       "accuracy cannot); ours are compared in the same form, and our absolute accuracies are "
                       "reported too."),
    "coverage": ("The paper fine-tunes five RobustBench CIFAR-10 l∞ models. The sources available when this "
                 "table was written give the numbers of one of them (Wang2023Better_WRN-28-10) and, for all "
                 "five, the range of the gains. The other four models are not named here and their cells are "
                 "n/a rather than guessed: add a row to PAPER_TABLE, with its source, to compare another model."),
}

# The paper's numbers in percent, as published (robust figures: A_δ/A, see PAPER["robust_figures"]).
# One row per model; "source" says where in the paper the row comes from.
PAPER_TABLE: dict[str, dict[str, Any]] = {
    "Wang2023Better_WRN-28-10": {
        "before": {"clean": 92.44, "w2": 52.14, "linf": 70.62},
        "after": {"clean": 78.19, "w2": 77.21, "linf": 90.64},
        "source": "arXiv:2502.09352, fine-tuning on the 50k original CIFAR-10 training images, δ = 8/255",
    },
}

# Gains after fine-tuning across the paper's five models, in points of A_δ/A (arXiv:2502.09352).
PAPER_GAIN_RANGES: dict[str, tuple[float, float]] = {"w2": (14.6, 25.1), "linf": (13.6, 20.0)}

# The protocol's settings (the paper's where stated, else the engine's documented defaults).
PROTOCOL: dict[str, Any] = {
    "dataset": DATASET, "threat_model": "w2-linf", "delta": DELTA,
    "n_examples": 10000,          # test images measured (the whole CIFAR-10 test set)
    "train_examples": None,       # all 50,000 original training images
    "epochs": 10, "batch_size": 512, "lr": 0.01, "beta": 6.0,
    "attack_steps": 10, "attack_step_ratio": 2.0, "budget": "dynamic",
    "wpgd_steps": 50, "pgd_steps": 20,
}

# --quick: a smoke run of every stage in minutes on a GPU; its numbers are not the paper's protocol.
QUICK: dict[str, Any] = {"n_examples": 500, "train_examples": 5000, "epochs": 1, "batch_size": 256,
                         "wpgd_steps": 20, "pgd_steps": 10}

_METRICS = (("clean", "clean_accuracy"), ("w2", "w2_robust_to_clean_ratio"), ("linf", "linf_robust_to_clean_ratio"))


@dataclass(frozen=True)
class ReproduceOptions:
    data_dir: Path
    model_dir: Path
    models: tuple[str, ...] = tuple(PAPER_TABLE)
    n_examples: int = PROTOCOL["n_examples"]
    train_examples: int | None = PROTOCOL["train_examples"]
    epochs: int = PROTOCOL["epochs"]
    batch_size: int = PROTOCOL["batch_size"]
    lr: float = PROTOCOL["lr"]
    attack_steps: int = PROTOCOL["attack_steps"]
    wpgd_steps: int = PROTOCOL["wpgd_steps"]
    pgd_steps: int = PROTOCOL["pgd_steps"]
    skip_finetune: bool = False
    device: str | None = None
    seed: int = 0
    quick: bool = False

    @classmethod
    def create(cls, *, quick: bool = False, **given: Any) -> ReproduceOptions:
        """Options from the protocol, the quick mode's values over them, and what was given over both
        (a given None means "not given")."""
        values = {**(QUICK if quick else {}), **{k: v for k, v in given.items() if v is not None}}
        return cls(quick=quick, **values)

    def check(self) -> None:
        if not self.models:
            raise ValidationError("name at least one RobustBench model.")
        for name, value, low in (("n_examples", self.n_examples, 1), ("epochs", self.epochs, 1),
                                 ("batch_size", self.batch_size, 2), ("attack_steps", self.attack_steps, 1),
                                 ("wpgd_steps", self.wpgd_steps, 1), ("pgd_steps", self.pgd_steps, 1)):
            if int(value) < low:
                raise ValidationError(f"{name.replace('_', '-')} must be at least {low}, got {value}.")
        if self.train_examples is not None and self.train_examples < 2:
            raise ValidationError(f"train-examples must be at least 2, got {self.train_examples}.")
        if not self.lr > 0:
            raise ValidationError(f"lr must be > 0, got {self.lr}.")
        if len(set(self.models)) != len(self.models):
            raise ValidationError(f"a model is named twice in {', '.join(self.models)}.")
        import pydantic

        try:    # the recipes' own bounds (most images, most steps...), as one error naming the fields
            _finetune_config(self)
            _evaluate_config(self)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                                 for err in exc.errors())
            raise ValidationError(f"the options give an invalid recipe: {problems}.") from None


def _cifar_files(data_dir: Path) -> list[Path]:
    folder = Path(data_dir) / "cifar-10-batches-py"
    return [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]


def check_inputs(options: ReproduceOptions) -> None:
    """Every file the run needs is present, checked before any work: a clear error naming the
    missing files and where they go (nothing is ever downloaded)."""
    options.check()
    from core.engine.architectures.robustbench_zoo import robustbench_entry
    from core.engine.zoo import robustbench_weights_path

    for name in options.models:
        robustbench_entry(name, dataset=DATASET, threat_model=THREAT_MODEL)   # a known, single model
    missing_data = [p for p in _cifar_files(options.data_dir) if not p.is_file()]
    if missing_data:
        folder = missing_data[0].parent
        raise DatasetUnavailable(
            f"CIFAR-10 is not complete under {folder}: missing {', '.join(p.name for p in missing_data)}. "
            f"Extract torchvision's cifar-10-python.tar.gz into {Path(options.data_dir)} (it creates "
            "cifar-10-batches-py/); reproduce never downloads.")
    missing = []
    for name in options.models:
        path = robustbench_weights_path(name, dataset=DATASET, threat_model=THREAT_MODEL, model_dir=options.model_dir)
        if not path.is_file():
            missing.append(path)
    if missing:
        raise ModelDownloadFailed(
            "RobustBench weights not found: " + "; ".join(str(p) for p in missing)
            + f". Place each model's RobustBench file at <model-dir>/{DATASET}/{THREAT_MODEL}/<name>.pt "
            "(where robustbench.utils.load_model(..., model_dir=<model-dir>) saves it); reproduce never downloads.")


def _finetune_config(options: ReproduceOptions) -> FinetuneConfig:
    from core.engine.config import FinetuneConfig

    return FinetuneConfig.model_validate({
        "threat_model": {"kind": PROTOCOL["threat_model"], "delta": PROTOCOL["delta"]},
        "epochs": options.epochs, "batch_size": options.batch_size, "lr": options.lr, "beta": PROTOCOL["beta"],
        "attack_loss": "redlr", "attack_steps": options.attack_steps,
        "attack_step_ratio": PROTOCOL["attack_step_ratio"], "budget": PROTOCOL["budget"],
        "augment": "crop_flip",
        # the paper trades clean accuracy for robustness (92.44 → 78.19 on Wang2023Better_WRN-28-10):
        # the best epoch by validation W2 robust accuracy, with no limit on the clean drop
        "selection": {"metric": "w2_robust_accuracy", "max_clean_drop": None},
        "train_examples": options.train_examples, "test_examples": options.n_examples,
        "test_wpgd_steps": options.wpgd_steps, "test_pgd_steps": options.pgd_steps,
        "eval_wpgd_steps": min(20, options.wpgd_steps), "eval_pgd_steps": min(10, options.pgd_steps),
        "validation_examples": min(1000, max(1, options.n_examples)),
        # the before/after attack ensemble: the quick mode's numbers are not the protocol's anyway
        "evaluation": "quick" if options.quick else "standard",
        "seed": options.seed,
    })


def _evaluate_config(options: ReproduceOptions) -> EvaluateConfig:
    from core.engine.config import EvaluateConfig

    # the same attacks as the fine-tune's test numbers: W-PGD-ReDLR (step ratio 1.875) and PGD-CE
    # with its default l∞ step 2.5·δ/steps, seeded alike
    return EvaluateConfig.model_validate({
        "threat_model": {"kind": PROTOCOL["threat_model"], "delta": PROTOCOL["delta"]},
        "n_examples": options.n_examples, "wpgd_steps": options.wpgd_steps, "attack_loss": "redlr",
        "linf_attacks": ["pgd"], "pgd_steps": options.pgd_steps, "pgd_step_ratio": 2.5 / options.pgd_steps,
        "pgd_loss": "ce", "seed": options.seed,
    })


def _ours(metrics: dict[str, Any]) -> dict[str, Any]:
    """Our numbers as fractions: clean, and the W2 and l∞ robust accuracies as A_δ/A (as the paper's)
    and absolute."""
    return {
        "clean": float(metrics["clean_accuracy"]),
        "w2": float(metrics["w2_robust_to_clean_ratio"]),
        "linf": float(metrics["linf_robust_to_clean_ratio"]),
        "w2_accuracy": float(metrics["w2_robust_accuracy"]),
        "linf_accuracy": float(metrics["linf_robust_accuracy"]),
        "n_examples": int(metrics["n_examples"]),
        "w2_converged": bool(metrics.get("w2_converged", True)),
    }


def _paper(name: str) -> dict[str, Any] | None:
    row = PAPER_TABLE.get(name)
    if row is None:
        return None
    return {stage: {k: row[stage][k] / 100.0 for k in ("clean", "w2", "linf")} for stage in ("before", "after")} | {
        "source": row["source"]}


Progress = Callable[[str], None]


def _hooks(name: str, say: Progress) -> Hooks:
    """The recipes' hooks, told as lines: each new phase, and every epoch's validation numbers."""
    from core.engine.hooks import Hooks

    last: dict[str, Any] = {"key": None}

    def progress(fraction: float, phase: str, metrics: dict[str, Any]) -> None:
        epoch, total = metrics.get("epoch"), metrics.get("total_epochs")
        if phase == "train" and "w2_robust_accuracy" in metrics:      # an epoch's end, with validation
            linf = metrics.get("linf_robust_accuracy", float("nan"))
            say(f"{name}: epoch {epoch}/{total}: validation clean {metrics['clean_accuracy']:.4f}, "
                f"W2 {metrics['w2_robust_accuracy']:.4f}, l-inf {linf:.4f}")
        elif (phase, epoch) != last["key"] and phase != "done":
            if phase == "train" and epoch == 0:
                say(f"{name}: estimating the global sensitivity for the W-PGD-Budget")
            elif phase == "evaluate" and epoch == 0:
                say(f"{name}: measuring the input (validation and test)")
            else:
                say(f"{name}: {phase}" + (f" (epoch {epoch}/{total})" if epoch and total and phase != "test" else ""))
        last["key"] = (phase, epoch)

    return Hooks(progress=progress, warn=lambda message, data: say(f"{name}: warning: {message}"))


def reproduce(options: ReproduceOptions, *, progress: Progress | None = None) -> dict[str, Any]:
    """Run the protocol on each model; the result dict (JSON-ready) holds, per model, our numbers
    before and after fine-tuning and the paper's (fractions in [0, 1]; None where the paper gives
    none), with the protocol and the paper's reference."""
    say = progress or (lambda message: None)
    check_inputs(options)
    from core.engine.data.datasets import load_dataset
    from core.engine.zoo import load_robustbench_model

    data = load_dataset(DATASET, data_dir=options.data_dir, allow_download=False)
    if data.test_x.shape[0] < options.n_examples:
        say(f"the test set has {data.test_x.shape[0]} images; measuring all of them")
    rows = []
    for name in options.models:
        started = time.monotonic()
        say(f"{name}: loading {DATASET}/{THREAT_MODEL} weights")
        model = load_robustbench_model(name, dataset=DATASET, threat_model=THREAT_MODEL,
                                       model_dir=options.model_dir, allow_download=False)
        row: dict[str, Any] = {"model": name, "in_paper": name in PAPER_TABLE, "paper": _paper(name)}
        if options.skip_finetune:
            from core.engine.recipes.evaluate import evaluate

            say(f"{name}: evaluating (clean, W-PGD {options.wpgd_steps} steps, PGD {options.pgd_steps} steps)")
            report = evaluate(_evaluate_config(options), model, data, _hooks(name, say), device=options.device,
                              context={"model": f"robustbench:{name}", "dataset": DATASET})
            summary = report.summary
            row["ours"] = {"before": _ours(summary), "after": None}
            row["warnings"] = list(report.warnings)
        else:
            from core.engine.recipes.finetune import finetune

            say(f"{name}: W-TRADES fine-tuning for {options.epochs} epoch(s), measuring before and after")
            result = finetune(_finetune_config(options), model, data, _hooks(name, say), device=options.device,
                              context={"model": f"robustbench:{name}", "dataset": DATASET})
            row["ours"] = {"before": _ours(result.before) if result.before is not None else None,
                           "after": _ours(result.after) if result.after is not None else None}
            row["finetune"] = {"best_epoch": result.best_epoch, "improved": result.improved,
                               "verdict": result.summary.get("verdict"),
                               "epochs_completed": result.epochs_completed,
                               "config": result.config, "validation": result.validation}
            row["warnings"] = list(result.warnings)
        row["seconds"] = round(time.monotonic() - started, 3)
        rows.append(row)
        del model
    return {
        "paper": {**PAPER, "gain_ranges_points": {k: list(v) for k, v in PAPER_GAIN_RANGES.items()}},
        "protocol": {**PROTOCOL, **{k: getattr(options, k) for k in (
            "n_examples", "train_examples", "epochs", "batch_size", "lr", "attack_steps", "wpgd_steps",
            "pgd_steps", "skip_finetune", "seed", "quick")},
            "matches_paper_protocol": _matches_protocol(options)},
        "models": rows,
    }


def _matches_protocol(options: ReproduceOptions) -> bool:
    return (not options.quick and not options.skip_finetune
            and all(getattr(options, k) == PROTOCOL[k] for k in (
                "n_examples", "train_examples", "epochs", "batch_size", "lr", "attack_steps", "wpgd_steps",
                "pgd_steps")))


# --- the printed table ---------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """Ours next to the paper's, in percent: clean accuracy, then W2 and l∞ robust accuracy as
    A_δ/A, before and after fine-tuning; then our absolute robust accuracies and the notes."""
    header = ("model", "stage", "clean ours", "clean paper", "W2 ours", "W2 paper", "l-inf ours", "l-inf paper",
              "W2 acc ours", "l-inf acc ours")
    lines: list[tuple[str, ...]] = []
    for row in result["models"]:
        for stage in ("before", "after"):
            ours = (row.get("ours") or {}).get(stage)
            paper = (row.get("paper") or {}).get(stage) if row.get("paper") else None
            cells = [row["model"] if stage == "before" else "", stage]
            for key in ("clean", "w2", "linf"):
                cells += [_pct(ours[key]) if ours else "skipped", _pct(paper[key]) if paper else "n/a"]
            cells += [_pct(ours["w2_accuracy"]) if ours else "skipped",
                      _pct(ours["linf_accuracy"]) if ours else "skipped"]
            lines.append(tuple(cells))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs).rstrip()

    protocol = result["protocol"]
    out = [f"W2 (l-inf cost) and l-inf robustness at δ=8/255 on CIFAR-10, {protocol['n_examples']} test images; "
           "W2 and l-inf columns are A_δ/A in %, 'acc' columns absolute accuracy in %.",
           fmt(header), fmt(tuple("-" * w for w in widths))]
    out += [fmt(line) for line in lines]
    for row in result["models"]:
        ours = row.get("ours") or {}
        if ours.get("before") and ours.get("after"):
            gains = ", ".join(
                f"{label} {100 * (ours['after'][k] - ours['before'][k]):+.1f} points (paper's five models: "
                f"+{PAPER_GAIN_RANGES[k][0]}..+{PAPER_GAIN_RANGES[k][1]})"
                for k, label in (("w2", "W2"), ("linf", "l-inf")))
            best = row.get("finetune", {}).get("best_epoch")
            out.append(f"{row['model']}: gain {gains}; best epoch {best}.")
        for warning in row.get("warnings") or []:
            out.append(f"{row['model']}: warning: {warning}")
    if not protocol["matches_paper_protocol"]:
        out.append("Not the paper's protocol (quick mode, fewer images, epochs or attack steps, or no fine-tune): "
                   "compare with care.")
    out.append(f"Paper: {result['paper']['reference']}. {result['paper']['robust_figures']}")
    out.append(result["paper"]["coverage"])
    return "\n".join(out)
