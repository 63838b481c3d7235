"""Robustness evaluation, one readable recipe: clean accuracy, W2 robust accuracy by W-PGD at
one or several radii, pointwise robust accuracy by PGD and/or AutoAttack, with ratios to the
clean accuracy, a JSON report and a PNG of accuracy against δ.

Every number is labelled with the radius and threat model it measures. The headline (summary)
is at the threat model's δ when that δ is among the radii, else at the largest radius, and it
says which. Attacks run in float32 unless bf16 is asked for (`amp`): bf16 weakens W-PGD.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.engine.attacks.autoattack import autoattack
from core.engine.attacks.pgd import pgd
from core.engine.attacks.wpgd import w_pgd
from core.engine.config import EvaluateConfig
from core.engine.data.datasets import ImageData, to_unit_float
from core.engine.defaults import resolve_eval_batch_size
from core.engine.device import Compute
from core.engine.hooks import Hooks
from core.engine.oom import AdaptiveBatch, report_halving
from core.engine.plots import robustness_curve_png
from core.engine.provenance import runtime_provenance, utc_timestamp
from core.engine.threats import Threat


@dataclass
class EvaluationReport:
    config: dict[str, Any]
    n_examples: int
    clean_accuracy: float
    w2: list[dict[str, Any]] = field(default_factory=list)         # one W-PGD result per δ
    pointwise: list[dict[str, Any]] = field(default_factory=list)  # PGD per δ, AutoAttack at δ
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> dict[str, Any] | None:
        """The W-PGD row at the headline radius (EvaluateConfig.headline_delta)."""
        delta, _ = EvaluateConfig.model_validate(self.config).headline_delta
        return next((r for r in self.w2 if abs(r["delta"] - delta) <= 1e-12 * max(1.0, delta)), None)

    @property
    def summary(self) -> dict[str, Any]:
        """Headline metrics, with the radius and threat models they measure and why that radius."""
        config = EvaluateConfig.model_validate(self.config)
        delta, source = config.headline_delta
        threat = Threat.from_spec(config.threat_model, delta)
        out: dict[str, Any] = {**threat.labels(), "delta_source": source, "n_examples": self.n_examples,
                               "clean_accuracy": self.clean_accuracy}
        row = self.headline
        if row is None:
            return out
        out["w2_robust_accuracy"] = row["robust_accuracy"]
        out["w2_robust_to_clean_ratio"] = row["robust_to_clean_ratio"]
        out["w2_converged"] = row["converged"]
        at_delta = [p for p in self.pointwise if abs(p["delta"] - row["delta"]) <= 1e-12 * max(1.0, delta)]
        if at_delta:
            strongest = min(at_delta, key=lambda p: p["robust_accuracy"])
            ground = strongest["threat"]
            out[f"{ground}_robust_accuracy"] = strongest["robust_accuracy"]
            out[f"{ground}_robust_to_clean_ratio"] = strongest["robust_to_clean_ratio"]
            out[f"{ground}_attack"] = strongest["attack"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "evaluate", "summary": self.summary, "warnings": self.warnings, "config": self.config,
                "provenance": self.provenance, "n_examples": self.n_examples,
                "clean_accuracy": self.clean_accuracy, "w2": self.w2, "pointwise": self.pointwise,
                "stopped": self.stopped}

    def plot_png(self) -> bytes:
        series = {"W2 (W-PGD)": [r["robust_accuracy"] for r in self.w2]}
        pgd_rows = [p for p in self.pointwise if p["attack"] == "pgd"]
        if pgd_rows:
            series[f"{pgd_rows[0]['threat']} (PGD)"] = [p["robust_accuracy"] for p in pgd_rows]
        return robustness_curve_png([r["delta"] for r in self.w2], series, self.clean_accuracy,
                                    "robust accuracy against the radius")


def evaluate(config: EvaluateConfig, model: torch.nn.Module, data: ImageData, hooks: Hooks | None = None,
             *, device: str | torch.device | None = None, context: dict[str, Any] | None = None) -> EvaluationReport:
    """Evaluate `model` on the test split; `context` (job, model and data set ids, the model's
    sha256) goes into the report's provenance as given."""
    hooks = hooks or Hooks()
    started_at = utc_timestamp()
    # the finest attack step taken: under bf16 a step below bf16's input spacing keeps the stem in float32
    finest_step = min([config.wpgd_step_ratio * min(config.radii) / config.wpgd_steps]
                      + ([config.pgd_step_ratio * min(config.radii)] if "pgd" in config.linf_attacks else []))
    compute = Compute.resolve(device, config.amp, config.channels_last, attack_step=finest_step)
    model = compute.prepare_model(model).eval()
    n = data.test_x.shape[0] if config.n_examples is None else min(config.n_examples, data.test_x.shape[0])
    x = compute.images(to_unit_float(data.test_x[:n], compute.device))
    batch_size = resolve_eval_batch_size(config.batch_size, compute.device.type, tuple(x.shape[1:]))
    y = data.test_y[:n].to(compute.device)
    base = Threat.from_spec(config.threat_model)
    w2_base = base if base.distributional else Threat(f"w2-{base.ground}", base.delta)
    radii = config.radii
    use_aa = "autoattack" in config.linf_attacks
    units = len(radii) * (1 + ("pgd" in config.linf_attacks)) + (4 if use_aa else 0)
    done = 0
    report = EvaluationReport(config=config.model_dump(mode="json"), n_examples=n, clean_accuracy=0.0)

    batch = AdaptiveBatch(batch_size, report_halving(hooks.event))
    for delta in radii:
        phase = f"w-pgd δ={delta:.4g}"
        res = batch.run(phase, lambda size: w_pgd(
            model, x, y, w2_base.with_delta(delta), steps=config.wpgd_steps, step_ratio=config.wpgd_step_ratio,
            loss=config.attack_loss, batch_size=size, compute=compute,
            progress=lambda t, T: hooks.progress((done + t / T) / units, phase, {"step": t, "total_steps": T}),
            should_stop=hooks.should_stop))
        report.clean_accuracy = res.clean_accuracy
        report.w2.append({"threat": w2_base.kind, **res.to_dict()})
        if not res.converged:
            message = (f"W-PGD had not converged at δ={delta:.4g}: the accuracy still fell in the last quarter of "
                       f"its {res.steps} steps ({res.accuracy_trajectory[(3 * res.steps) // 4]:.4f} → "
                       f"{res.robust_accuracy:.4f}), so {res.robust_accuracy:.4f} is an upper bound; raise "
                       "wpgd_steps for a tighter number.")
            report.warnings.append(message)
            hooks.warn(message, {"delta": delta, "steps": res.steps})
        done += 1
        hooks.progress(done / units, phase, {"clean_accuracy": res.clean_accuracy,
                                             "w2_robust_accuracy": res.robust_accuracy, "delta": delta})
        if hooks.should_stop():
            report.stopped = True
            report.provenance = _provenance(config, n, compute, context, started_at, batch_size)
            return report
        if "pgd" in config.linf_attacks:
            # the l∞ step is a fixed fraction of each radius attacked; l2 keeps PGD's own default
            p = batch.run(f"pgd δ={delta:.4g}", lambda size: pgd(
                model, x, y, w2_base.pointwise.with_delta(delta), steps=config.pgd_steps,
                step_size=config.pgd_step_ratio * delta if base.ground == "linf" else None,
                loss=config.pgd_loss, batch_size=size, compute=compute,
                generator=torch.Generator(device=compute.device).manual_seed(config.seed),
                should_stop=hooks.should_stop))
            report.pointwise.append(p.to_dict())
            done += 1
            hooks.progress(done / units, f"pgd δ={delta:.4g}", {})
            if hooks.should_stop():
                report.stopped = True
                return report

    if use_aa:
        m = min(config.autoattack_examples, n)
        aa_threat = w2_base.pointwise.with_delta(config.headline_delta[0])
        with compute.autocast():
            result = batch.run("autoattack", lambda size: autoattack(
                model, x[:m], y[:m], aa_threat, batch_size=size, seed=config.seed,
                on_attack=lambda name, k, total: hooks.progress((done + k) / units, f"autoattack: {name}", {})))
        report.pointwise.append({**result.to_dict(), "threat": w2_base.ground})
    report.provenance = _provenance(config, n, compute, context, started_at, batch_size)
    hooks.progress(1.0, "done", report.summary)
    return report


def _provenance(config: EvaluateConfig, n: int, compute: Compute, context: dict[str, Any] | None,
                started_at: str, batch_size: int) -> dict[str, Any]:
    return {**(context or {}), "seed": config.seed, "examples": {"test": n}, **runtime_provenance(compute.device),
            "evaluation_precision": "bf16" if compute.amp_dtype is not None else "float32",
            "float32_stem": compute.float32_stem,
            # the batch the attacks ran with: config.batch_size resolved on this device ("auto")
            "batch_size": batch_size,
            "started_at": started_at, "finished_at": utc_timestamp()}
