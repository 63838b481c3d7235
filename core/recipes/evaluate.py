"""Robustness evaluation, one readable recipe: clean accuracy, W2 robust accuracy by W-PGD at
one or several radii, pointwise robust accuracy by PGD and/or AutoAttack, with ratios to the
clean accuracy, a JSON report and a PNG of accuracy against δ (algorithm.md, "evaluation")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.attacks.autoattack import autoattack
from core.attacks.pgd import pgd
from core.attacks.wpgd import w_pgd
from core.config import EvaluateConfig
from core.data import ImageData, to_unit_float
from core.device import Compute
from core.hooks import Hooks
from core.oom import AdaptiveBatch, report_halving
from core.plots import robustness_curve_png
from core.threats import Threat


@dataclass
class EvaluationReport:
    config: dict[str, Any]
    n_examples: int
    clean_accuracy: float
    w2: list[dict[str, Any]] = field(default_factory=list)         # one W-PGD result per δ
    pointwise: list[dict[str, Any]] = field(default_factory=list)  # PGD per δ, AutoAttack at δ
    stopped: bool = False

    @property
    def headline(self) -> dict[str, Any] | None:
        """The W-PGD row at the threat model's δ (the first radius if the curve does not contain it)."""
        delta = self.config.get("threat_model", {}).get("delta")
        return next((r for r in self.w2 if r["delta"] == delta), self.w2[0] if self.w2 else None)

    @property
    def summary(self) -> dict[str, float]:
        """Headline metrics at the threat model's δ."""
        out: dict[str, float] = {"clean_accuracy": self.clean_accuracy}
        row = self.headline
        if row is None:
            return out
        out["w2_robust_accuracy"] = row["robust_accuracy"]
        out["w2_robust_to_clean_ratio"] = row["robust_to_clean_ratio"]
        at_delta = [p for p in self.pointwise if p["delta"] == row["delta"]]
        if at_delta:
            strongest = min(at_delta, key=lambda p: p["robust_accuracy"])
            ground = "linf" if strongest["threat"] == "linf" else "l2"
            out[f"{ground}_robust_accuracy"] = strongest["robust_accuracy"]
            out[f"{ground}_robust_to_clean_ratio"] = strongest["robust_to_clean_ratio"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "evaluate", "config": self.config, "n_examples": self.n_examples,
                "clean_accuracy": self.clean_accuracy, "summary": self.summary,
                "w2": self.w2, "pointwise": self.pointwise, "stopped": self.stopped}

    def plot_png(self) -> bytes:
        series = {"W2 (W-PGD)": [r["robust_accuracy"] for r in self.w2]}
        pgd_rows = [p for p in self.pointwise if p["attack"] == "pgd"]
        if pgd_rows:
            series[f"{pgd_rows[0]['threat']} (PGD)"] = [p["robust_accuracy"] for p in pgd_rows]
        return robustness_curve_png([r["delta"] for r in self.w2], series, self.clean_accuracy,
                                    "robust accuracy against the radius")


def evaluate(config: EvaluateConfig, model: torch.nn.Module, data: ImageData, hooks: Hooks | None = None,
             *, device: str | torch.device | None = None) -> EvaluationReport:
    hooks = hooks or Hooks()
    compute = Compute.resolve(device, config.amp, config.channels_last)
    model = compute.prepare_model(model).eval()
    n = data.test_x.shape[0] if config.n_examples is None else min(config.n_examples, data.test_x.shape[0])
    x = compute.images(to_unit_float(data.test_x[:n], compute.device))
    y = data.test_y[:n].to(compute.device)
    base = Threat.from_spec(config.threat_model)
    w2_base = base if base.distributional else Threat(f"w2-{base.ground}", base.delta)
    radii = config.radii
    use_aa = "autoattack" in config.linf_attacks
    units = len(radii) * (1 + ("pgd" in config.linf_attacks)) + (4 if use_aa else 0)
    done = 0
    report = EvaluationReport(config=config.model_dump(mode="json"), n_examples=n, clean_accuracy=0.0)

    batch = AdaptiveBatch(config.batch_size, report_halving(hooks.event))
    for delta in radii:
        phase = f"w-pgd δ={delta:.4g}"
        res = batch.run(phase, lambda size: w_pgd(
            model, x, y, w2_base.with_delta(delta), steps=config.wpgd_steps, step_ratio=config.wpgd_step_ratio,
            loss=config.attack_loss, batch_size=size, compute=compute,
            progress=lambda t, T: hooks.progress((done + t / T) / units, phase, {"step": t, "total_steps": T}),
            should_stop=hooks.should_stop))
        report.clean_accuracy = res.clean_accuracy
        report.w2.append(res.to_dict())
        done += 1
        hooks.progress(done / units, phase, {"clean_accuracy": res.clean_accuracy,
                                             "w2_robust_accuracy": res.robust_accuracy})
        if hooks.should_stop():
            report.stopped = True
            return report
        if "pgd" in config.linf_attacks:
            p = batch.run(f"pgd δ={delta:.4g}", lambda size: pgd(
                model, x, y, w2_base.pointwise.with_delta(delta), steps=config.pgd_steps,
                step_size=config.pgd_step_size * delta / w2_base.delta if base.ground == "linf" else None,
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
        result = batch.run("autoattack", lambda size: autoattack(
            model, x[:m], y[:m], w2_base.pointwise, batch_size=size, seed=config.seed,
            on_attack=lambda name, k, total: hooks.progress((done + k) / units, f"autoattack: {name}", {})))
        report.pointwise.append({**result.to_dict(), "threat": w2_base.ground})
    hooks.progress(1.0, "done", report.summary)
    return report
