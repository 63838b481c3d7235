"""Throughput of the engine against two baselines, measured side by side in the same run.

    python bench/bench_engine.py --out bench/results/<machine>.json       # every model, this machine
    python bench/bench_engine.py --models small-cnn --repeats 2           # one model
    python bench/render_runtimes.py bench/results/<machine>.json          # the docs' performance section

Three implementations of each workload, run interleaved (ours, lean, reference, ours, lean, ...)
`--repeats` times on the same model, data and threads; each reports min/median/max throughput
and the ratio ours/baseline of every repetition (min/median/max of the per-repetition ratios).

W-PGD (evaluation, images·steps/s), w2-linf at δ = 8/255, ReDLR, step ratio 1.875:
- ours: core.engine.attacks.w_pgd with the defaults a user gets from EvaluateConfig: float32, the batch
  "auto" resolves to on this device (core.engine.defaults.auto_eval_batch_size), channels_last on a GPU.
  Per step one forward and one backward per image (the accuracy of iterate t is read from the
  forward that takes step t+1's gradient) and one final forward.
- lean: the algorithm written plainly: batch 32, gradients copied to the host for the whole-set
  normalisation and closed-form projection, a separate evaluation pass after every step.
- reference: the structure of the 2023/2025 papers' reference attacker, written here from the
  published algorithm (algorithm.md): batch 100, per step a forward, loss and autograd.grad per
  batch, per-image gradient norms, the step α·h_i/N with the whole-set normaliser, projection
  onto the W2 ball by bisection on the shrink factor (each trial a host-synchronised distance),
  then a separate evaluation pass.

W-TRADES (training, images/s), K inner steps, β = 6, same batch size for all three (the batch
is a recipe choice, not an engine speed):
- ours: core.engine.recipes.finetune.w_trades_step with FinetuneConfig's defaults (ReDLR inner loss,
  dynamic budget, random weight perturbation; bf16 autocast and channels_last on a GPU).
- lean: KL inner loss, float32, the clean forward recomputed in every inner step, gradients
  copied to the host for the normalisation.
- reference: the TRADES loop's structure with the W2 step: KL inner loss with the clean
  forward recomputed every inner step, per-image norms, bisection projection; then the outer
  CE + β·KL step.

Pass counts (forward/backward images per image per step) are counted with hooks on the model
and are machine-independent: W-PGD ours = (T+1)/T forward and 1 backward per image per step.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.engine.attacks.wpgd import w_pgd  # noqa: E402
from core.engine.config import EvaluateConfig, FinetuneConfig  # noqa: E402
from core.engine.defaults import resolve_eval_batch_size  # noqa: E402
from core.engine.device import Compute  # noqa: E402
from core.engine.losses import kl_divergence, redlr  # noqa: E402
from core.engine.provenance import cpu_name  # noqa: E402
from core.engine.recipes.finetune import RandomWeightPerturbation, w_trades_step  # noqa: E402
from core.engine.threats import Threat  # noqa: E402
from core.engine.zoo import create_model  # noqa: E402

DELTA = 8 / 255
MODELS: dict[str, dict] = {
    "small-cnn": {"shape": (1, 8, 8), "dataset": "digits", "label": "digits small CNN (1×8×8)"},
    "preact-resnet-18": {"shape": (3, 32, 32), "dataset": "cifar10", "label": "PreAct-ResNet-18 (3×32×32)"},
    "wide-resnet-28-10": {"shape": (3, 32, 32), "dataset": "cifar10", "label": "WideResNet-28-10 (3×32×32)"},
}
# Sizes per device: (W-PGD images, W-PGD steps, W-TRADES batch, W-TRADES batches, K). The CPU
# sizes keep a whole run under 3 minutes on 2 cores; the GPU ones are CIFAR-scale.
SIZES = {
    "cpu": {"small-cnn": (1024, 5, 32, 4, 10), "preact-resnet-18": (48, 2, 8, 1, 2),
            "wide-resnet-28-10": (8, 1, 4, 1, 1)},
    "cuda": {"small-cnn": (10000, 10, 512, 4, 10), "preact-resnet-18": (5000, 10, 512, 4, 10),
             "wide-resnet-28-10": (5000, 10, 512, 4, 10)},
}
IMPLEMENTATIONS = ("ours", "lean", "reference")


# --- pass counting ----------------------------------------------------------------------------
class PassCounter:
    """Images through the model's forward and backward, counted with hooks on the top module."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.forward, self.backward = model, 0, 0
        self._handle: RemovableHandle | None = None

    def _hook(self, _module, _inputs, output) -> None:
        out = output if isinstance(output, torch.Tensor) else output[0]
        self.forward += out.shape[0]
        if out.requires_grad:
            n = out.shape[0]

            def on_backward(grad: torch.Tensor) -> None:
                self.backward += n
            out.register_hook(on_backward)

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()


# --- shared pieces of the baselines ---------------------------------------------------------------
def _w2_linf_direction(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h_i = sgn(g_i)·‖g_i‖_1 and the per-image ‖g_i‖_1."""
    l1 = g.flatten(1).abs().sum(1)
    return g.sign() * l1[:, None, None, None], l1


def _closed_form_project(x_adv: torch.Tensor, x: torch.Tensor, delta: float) -> torch.Tensor:
    e = x_adv - x
    linf = e.flatten(1).abs().amax(1)
    rho = min(1.0, delta / (float(torch.sqrt(torch.mean(linf ** 2))) + 1e-12))
    b = (rho * linf)[:, None, None, None]
    return (x + torch.maximum(torch.minimum(e, b), -b)).clamp(0, 1)


def bisection_project(x_adv: torch.Tensor, x: torch.Tensor, delta: float, iterations: int = 30) -> torch.Tensor:
    """Projection onto the W2 (l∞ ground cost) ball by bisection on the shrink factor ρ ∈ [0, 1]:
    the largest ρ whose clamped set lies within δ (the closed form's ρ, found by search)."""
    e = x_adv - x
    linf = e.flatten(1).abs().amax(1)

    def shrunk(rho: float) -> torch.Tensor:
        b = (rho * linf)[:, None, None, None]
        return torch.maximum(torch.minimum(e, b), -b)

    def distance(t: torch.Tensor) -> float:
        return float(torch.sqrt(torch.mean(t.flatten(1).abs().amax(1).double() ** 2)))

    if distance(e) <= delta:
        return x_adv.clamp(0, 1)
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if distance(shrunk(mid)) > delta:
            hi = mid
        else:
            lo = mid
    return (x + shrunk(lo)).clamp(0, 1)


def _accuracy(model, x, y, batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / x.shape[0]


# --- W-PGD: the three implementations ---------------------------------------------------------------
def lean_w_pgd(model, x, y, delta: float, steps: int, batch_size: int = 32, ratio: float = 1.875) -> float:
    """Plain W-PGD: host-side normalisation and projection, a separate evaluation pass per step."""
    device = x.device
    x_host = x.cpu()
    x_adv = x_host.clone()
    alpha = ratio * delta / steps
    accs = [_accuracy(model, x, y, batch_size)]
    for _ in range(steps):
        grads = []
        for i in range(0, x.shape[0], batch_size):
            xb = x_adv[i:i + batch_size].to(device).requires_grad_(True)
            (g,) = torch.autograd.grad(redlr(model(xb), y[i:i + batch_size]).sum(), xb)
            grads.append(g.cpu())
        h, l1 = _w2_linf_direction(torch.cat(grads))
        n = torch.sqrt(torch.mean(l1 ** 2)).clamp_min(1e-30)
        x_adv = _closed_form_project(x_adv + alpha * h / n, x_host, delta)
        accs.append(_accuracy(model, x_adv.to(device), y, batch_size))
    return min(accs)


def reference_w_pgd(model, x, y, delta: float, steps: int, batch_size: int = 100, ratio: float = 1.875) -> float:
    """The reference attacker's structure: per step and batch forward, loss, autograd.grad; per-image
    gradient norms; the normalised step over the whole set; bisection projection; then evaluation."""
    x_adv = x.clone()
    alpha = ratio * delta / steps
    accs = [_accuracy(model, x, y, batch_size)]
    for _ in range(steps):
        grads = []
        for i in range(0, x.shape[0], batch_size):
            xb = x_adv[i:i + batch_size].clone().detach().requires_grad_(True)
            loss = redlr(model(xb), y[i:i + batch_size]).sum()
            grads.append(torch.autograd.grad(loss, xb)[0].detach())
        g = torch.cat(grads)
        norms = torch.stack([gi.abs().sum() for gi in g])            # per-image ‖g_i‖_1
        normaliser = float(torch.sqrt(torch.mean(norms ** 2))) + 1e-30
        step = torch.stack([gi.sign() * ni for gi, ni in zip(g, norms, strict=True)]) * (alpha / normaliser)
        x_adv = bisection_project(x_adv + step, x, delta)
        accs.append(_accuracy(model, x_adv, y, batch_size))
    return min(accs)


def ours_w_pgd(model, x, y, delta: float, steps: int, compute: Compute, batch_size: int) -> float:
    config = EvaluateConfig()
    return w_pgd(model, x, y, Threat("w2-linf", delta), steps=steps, step_ratio=config.wpgd_step_ratio,
                 loss=config.attack_loss, batch_size=batch_size, compute=compute).robust_accuracy


def user_eval_compute(device: torch.device, steps: int) -> Compute:
    """The Compute an evaluate job with EvaluateConfig's defaults gets on `device`."""
    config = EvaluateConfig()
    return Compute.resolve(device, config.amp, config.channels_last,
                           attack_step=config.wpgd_step_ratio * DELTA / steps)


def user_eval_batch(device: torch.device, shape: tuple[int, ...]) -> int:
    return resolve_eval_batch_size(EvaluateConfig().batch_size, device.type, shape)


# --- W-TRADES: the three implementations ---------------------------------------------------------------
def _trades_outer(model, opt, x, y, x_adv, beta: float) -> None:
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, y) + beta * kl_divergence(logits, model(x_adv.detach())).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def lean_trades_step(model, opt, x, y, delta: float, steps: int, beta: float = 6.0) -> None:
    model.eval()
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    alpha = 2.0 * delta / steps
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(kl_divergence(model(x), model(x_adv)).sum(), x_adv)
        h, l1 = _w2_linf_direction(g.cpu())
        n = float(torch.sqrt(torch.mean(l1 ** 2))) + 1e-30
        x_adv = _closed_form_project(x_adv.detach() + alpha * h.to(x.device) / n, x, delta)
    _trades_outer(model, opt, x, y, x_adv, beta)


def reference_trades_step(model, opt, x, y, delta: float, steps: int, beta: float = 6.0) -> None:
    model.eval()
    x_adv = (x.detach() + 0.001 * torch.randn_like(x)).clamp(0, 1)
    alpha = 2.0 * delta / steps
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        g = torch.autograd.grad(loss_kl, [x_adv])[0]
        norms = torch.stack([gi.abs().sum() for gi in g])
        normaliser = float(torch.sqrt(torch.mean(norms ** 2))) + 1e-30
        step = torch.stack([gi.sign() * ni for gi, ni in zip(g, norms, strict=True)]) * (alpha / normaliser)
        x_adv = bisection_project(x_adv.detach() + step, x, delta).detach()
    _trades_outer(model, opt, x, y, x_adv, beta)


class OursTrades:
    """The recipe's step with FinetuneConfig's defaults (dynamic budget, weight perturbation)."""

    def __init__(self, model, opt, steps: int, compute: Compute, seed: int = 0) -> None:
        self.config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_steps=steps)
        self.model, self.opt, self.compute = model, opt, compute
        self.perturbation = RandomWeightPerturbation(model, self.config.weight_perturbation)
        self.generator = torch.Generator(device=compute.device).manual_seed(seed)
        self.upsilon: torch.Tensor | None = torch.zeros((), device=compute.device, dtype=torch.float64)
        self.threat = Threat("w2-linf", DELTA)

    def __call__(self, x, y) -> None:
        _, _, self.upsilon = w_trades_step(self.model, self.opt, x, y, threat=self.threat, config=self.config,
                                           compute=self.compute, perturbation=self.perturbation,
                                           generator=self.generator, upsilon_ema=self.upsilon)


def user_train_compute(device: torch.device, steps: int) -> Compute:
    config = FinetuneConfig(attack_steps=steps)
    return Compute.resolve(device, config.amp, config.channels_last,
                           attack_step=config.attack_step_ratio * DELTA / steps)


# --- running pairs ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@dataclass
class Workload:
    """One workload's implementations: name → (run once, units of work per run, batch size)."""

    name: str
    unit: str
    runs: Mapping[str, Callable[[], object]]
    work: float                     # images·steps (W-PGD) or images (W-TRADES) per run
    batch_sizes: dict[str, int]
    per_step: float                 # images·steps per run, to turn pass counts into per image per step
    models: dict[str, torch.nn.Module]


def measure(w: Workload, device: torch.device, repeats: int) -> dict:
    """Count passes in a first (warm-up) run of each implementation, then time `repeats`
    interleaved rounds."""
    passes = {}
    for name, run in w.runs.items():
        with PassCounter(w.models[name]) as counter:
            run()
        passes[name] = {"forward": counter.forward / w.per_step, "backward": counter.backward / w.per_step}
    times: dict[str, list[float]] = {name: [] for name in w.runs}
    for _ in range(repeats):
        for name, run in w.runs.items():
            times[name].append(_timed(run, device))
    out: dict[str, Any] = {"workload": w.name, "unit": w.unit, "work_per_run": w.work, "repeats": repeats,
                           "implementations": {}}
    for name in w.runs:
        out["implementations"][name] = {"batch_size": w.batch_sizes[name], "passes_per_image_step": passes[name],
                                        "throughput": _spread([w.work / t for t in times[name]]),
                                        "seconds": times[name]}
    out["ratios"] = {base: _spread([b / o for o, b in zip(times["ours"], times[base], strict=True)])
                     for base in w.runs if base != "ours"}
    return out


def build_model(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    spec = MODELS[name]
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=spec["shape"][0], image_size=spec["shape"][1:],
                        dataset=spec["dataset"]).to(device).eval()


def _compile(model: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    compiled = torch.compile(model) if backend in (None, "inductor") else torch.compile(model, backend=backend)
    return cast(torch.nn.Module, compiled)   # an OptimizedModule, which torch annotates as a callable


def wpgd_workload(name: str, device: torch.device, n: int, steps: int, compile_model: bool = False,
                  backend: str | None = None) -> Workload:
    shape = MODELS[name]["shape"]
    model = build_model(name, device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((n, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    compute = user_eval_compute(device, steps)
    fast = compute.prepare_model(build_model(name, device))
    fast.load_state_dict(model.state_dict())
    xf = compute.images(x)
    batch = user_eval_batch(device, shape)
    base_model = model
    if compile_model:
        fast, base_model = _compile(fast, backend), _compile(model, backend)
    runs = {"ours": lambda: ours_w_pgd(fast, xf, y, DELTA, steps, compute, batch),
            "lean": lambda: lean_w_pgd(base_model, x, y, DELTA, steps),
            "reference": lambda: reference_w_pgd(base_model, x, y, DELTA, steps)}
    return Workload("w-pgd", "images·steps/s", runs, n * steps, {"ours": batch, "lean": 32, "reference": 100},
                    n * steps, {"ours": fast, "lean": base_model, "reference": base_model})


def wtrades_workload(name: str, device: torch.device, batch: int, batches: int, steps: int,
                     compile_model: bool = False, backend: str | None = None) -> Workload:
    shape = MODELS[name]["shape"]
    g = torch.Generator().manual_seed(2)
    x = torch.rand((batch * batches, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (x.shape[0],), generator=g).to(device)
    compute = user_train_compute(device, steps)
    models = {impl: build_model(name, device) for impl in IMPLEMENTATIONS}
    models["ours"] = compute.prepare_model(models["ours"])
    if compile_model:
        models = {k: _compile(m, backend) for k, m in models.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    ours = OursTrades(models["ours"], opts["ours"], steps, compute)
    xf = compute.images(x)

    def loop(step: Callable, xs: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            for i in range(0, xs.shape[0], batch):
                step(xs[i:i + batch], y[i:i + batch])
        return run

    runs = {"ours": loop(ours, xf),
            "lean": loop(lambda a, b: lean_trades_step(models["lean"], opts["lean"], a, b, DELTA, steps), x),
            "reference": loop(lambda a, b: reference_trades_step(models["reference"], opts["reference"], a, b,
                                                                 DELTA, steps), x)}
    return Workload("w-trades", "images/s", runs, x.shape[0], dict.fromkeys(IMPLEMENTATIONS, batch),
                    x.shape[0], models)


def run_model(name: str, device: torch.device, repeats: int, sizes: tuple[int, int, int, int, int],
              compile_model: bool = False, workloads: tuple[str, ...] = ("w-pgd", "w-trades"),
              backend: str | None = None) -> list[dict]:
    """Both workloads of one model; `backend`: torch.compile's backend when compiling (default inductor)."""
    n, steps, tbatch, tbatches, k = sizes
    rows = []
    if "w-pgd" in workloads:
        row = measure(wpgd_workload(name, device, n, steps, compile_model, backend), device, repeats)
        rows.append({"model": name, "model_label": MODELS[name]["label"], "n_images": n, "steps": steps,
                     "compiled": (backend or "inductor") if compile_model else False, **row})
    if "w-trades" in workloads:
        row = measure(wtrades_workload(name, device, tbatch, tbatches, k, compile_model, backend), device,
                      repeats)
        rows.append({"model": name, "model_label": MODELS[name]["label"], "n_images": tbatch * tbatches,
                     "steps": k, "compiled": (backend or "inductor") if compile_model else False, **row})
    return rows


def environment(device: torch.device, machine: str) -> dict:
    import os
    return {"machine": machine, "device": torch.cuda.get_device_name() if device.type == "cuda" else
            f"CPU: {cpu_name()}, {os.cpu_count()} cores", "device_type": device.type,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "created": datetime.now(UTC).isoformat(timespec="seconds")}


def table(rows: list[dict]) -> str:
    """A Markdown table: one line per (model, workload, baseline)."""
    lines = ["| model | workload | implementation | batch | throughput min / median / max "
             "| ours ÷ this (median, min–max) | fwd / bwd per image·step |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for impl, v in r["implementations"].items():
            t, p = v["throughput"], v["passes_per_image_step"]
            ratio = "—" if impl == "ours" else (
                f"{r['ratios'][impl]['median']:.2f}× ({r['ratios'][impl]['min']:.2f}–{r['ratios'][impl]['max']:.2f})")
            compiled = f" (compiled: {r['compiled']})" if r.get("compiled") else ""
            what = f"{r['workload']}{compiled}, {r['n_images']} img × {r['steps']} steps"
            lines.append(f"| {r['model']} | {what} | {impl} | {v['batch_size']} | {t['min']:.1f} / {t['median']:.1f} / "
                         f"{t['max']:.1f} {r['unit']} | {ratio} | {p['forward']:.2f} / {p['backward']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--workloads", default="w-pgd,w-trades")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, help="W-PGD images (default per device and model)")
    ap.add_argument("--steps", type=int, help="W-PGD steps")
    ap.add_argument("--train-batch", type=int, help="W-TRADES batch size")
    ap.add_argument("--train-batches", type=int, help="W-TRADES batches per run")
    ap.add_argument("--k", type=int, help="W-TRADES inner steps K")
    ap.add_argument("--compile", action="store_true", help="torch.compile every implementation's model")
    ap.add_argument("--machine", default=platform.node() or "unknown", help="label stored with the results")
    ap.add_argument("--out", help="write the results as JSON here (e.g. bench/results/<machine>.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    workloads = tuple(w.strip() for w in args.workloads.split(","))
    if set(workloads) - {"w-pgd", "w-trades"}:
        ap.error("--workloads takes w-pgd and/or w-trades")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in models:
        n, steps, tb, tbs, k = SIZES["cuda" if device.type == "cuda" else "cpu"][name]
        sizes = (args.n or n, args.steps or steps, args.train_batch or tb, args.train_batches or tbs, args.k or k)
        rows += run_model(name, device, args.repeats, sizes, args.compile, workloads)
    threads_env = [f"OMP_NUM_THREADS={v}" for v in [__import__("os").environ.get("OMP_NUM_THREADS")] if v]
    command = [*threads_env, "python", "bench/bench_engine.py", *(argv if argv is not None else sys.argv[1:])]
    result = {**environment(device, args.machine), "command": " ".join(command), "rows": rows}
    print(f"{result['device']}, {result['threads']} threads, torch {result['torch']}")
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
