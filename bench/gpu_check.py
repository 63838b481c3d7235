"""The one GPU check: run once on a machine with one GPU (H100/H200), within 8 minutes.

    make gpu-check                                  # python bench/gpu_check.py --out bench/results/gpu-check.json
    python bench/gpu_check.py --cpu-smoke           # every code path at tiny sizes on a CPU (the CI test)

Sections, each timed and guarded (a failing one records its error and the rest still run; a
section that would pass the total deadline is stopped by an alarm and recorded as timed out):
- precision: W-PGD on a small CNN trained on digits: the evaluation precision a user gets
  (EvaluateConfig defaults: float32, auto batch, channels_last, cuDNN's defaults) against strict
  float32 (no TF32, batch 100, contiguous): the robust accuracy must be the same; bf16 autocast
  with and without the float32 stem against float32: the difference is reported.
- throughput: W-PGD and W-TRADES on WideResNet-28-10 against the lean and reference-structure
  baselines of bench_engine.py, without and with torch.compile.
- schedules: the whole fine-tune (the real recipe, the digits CNN, the user's auto epochs, batch and
  lr) with the default schedule and with attack_schedule "allocate", from the same start model per
  seed in a rotated order: job and training seconds, the speed-up per seed, W2 before → after.
- service: the embedded service (`robustify serve`) in a subprocess on a free port, a tiny
  fine-tune submitted through the SDK (`robustify.Client`) and waited for.
Writes one JSON file and the table beside it (.txt), after every section, and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402
import fast_wtrades  # noqa: E402
import torch  # noqa: E402

DEADLINE_S = 8 * 60 - 20          # the whole check, with a margin for writing the results


class SectionTimeout(Exception):
    pass


def _alarm(_sig, _frame) -> None:
    raise SectionTimeout("the section ran past the check's deadline")


def run_section(results: dict, name: str, fn: Callable[[], dict], deadline: float) -> None:
    """Run fn within what is left of the deadline; record its result or error and its time."""
    left = deadline - time.monotonic()
    if left < 5:
        results["sections"][name] = {"ok": False, "error": "skipped: the total deadline was reached", "seconds": 0.0}
        return
    t = time.monotonic()
    has_alarm = hasattr(signal, "SIGALRM")
    if has_alarm:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(left)))
    try:
        out = {"ok": True, **fn()}
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, the check goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        if has_alarm:
            signal.alarm(0)
    out["seconds"] = round(time.monotonic() - t, 2)
    results["sections"][name] = out
    print(f"[{name}] {'ok' if out['ok'] else 'FAILED: ' + out['error']} ({out['seconds']} s)", flush=True)


# --- (a) precision ---------------------------------------------------------------------------------
def trained_digits_model(epochs: int, device: torch.device) -> tuple[torch.nn.Module, Any]:
    from core.engine.data.datasets import load_digits
    from core.engine.recipes.standard import train_standard
    from core.engine.zoo import create_model

    data = load_digits()
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")
    return train_standard(model, data, epochs=epochs, device=device), data


def precision_section(device: torch.device, sizes: dict) -> dict:
    from core.engine.config import EvaluateConfig
    from core.engine.recipes.evaluate import evaluate

    model, data = trained_digits_model(sizes["train_epochs"], device)
    base = {"threat_model": {"kind": "w2-linf", "delta": 0.1}, "n_examples": sizes["n_eval"],
            "wpgd_steps": sizes["wpgd_steps"], "linf_attacks": [], **sizes["precision_config"]}

    def run(strict: bool = False, **over: Any) -> dict:
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        if strict:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            report = evaluate(EvaluateConfig(**{**base, **over}), copy.deepcopy(model), data,
                              device=device)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        row = report.w2[0]
        return {"robust_accuracy": row["robust_accuracy"], "clean_accuracy": row["clean_accuracy"],
                "batch_size": report.provenance["batch_size"], "precision": report.provenance["evaluation_precision"],
                "float32_stem": report.provenance["float32_stem"]}

    default = run()
    strict = run(strict=True, batch_size=100, channels_last=False)
    bf16 = run(amp="bf16")
    n = sizes["n_eval"]
    with_stem = bf16["float32_stem"]
    return {"model": "small-cnn trained on digits", "n_examples": n, "delta": 0.1, "wpgd_steps": sizes["wpgd_steps"],
            "evaluation_default": default, "float32_strict": strict, "bf16": bf16,
            "same_robust_accuracy": default["robust_accuracy"] == strict["robust_accuracy"],
            "default_minus_float32_images": round((default["robust_accuracy"] - strict["robust_accuracy"]) * n),
            "bf16_minus_float32_images": round((bf16["robust_accuracy"] - strict["robust_accuracy"]) * n),
            "bf16_float32_stem": with_stem}


# --- (b) throughput ----------------------------------------------------------------------------------
def throughput_section(device: torch.device, sizes: dict) -> dict:
    rows = []
    name = sizes["throughput_model"]
    rows += bench_engine.run_model(name, device, sizes["repeats"], sizes["plain"], compile_model=False)
    rows += bench_engine.run_model(name, device, sizes["compiled_repeats"], sizes["compiled"], compile_model=True,
                                   backend=sizes["compile_backend"])
    return {"rows": rows, "table": bench_engine.table(rows)}


# --- (c) the schedules: the default and allocate, the whole fine-tune ------------------------------------
SCHEDULES: dict[str, dict[str, Any]] = {
    "default": {},                                   # FinetuneConfig's defaults, whatever they are today
    "allocate": {"attack_schedule": "allocate"},     # fast W-TRADES: one step, the W2 budget allocated
}


def schedules_section(device: torch.device, sizes: dict) -> dict:
    """The real fine-tune recipe (core.engine.recipes.finetune) from the same start model per seed,
    once per schedule in a rotated order: the job's time, its training time (fast_wtrades.TrainClock:
    the attacks and outer steps, not the per-epoch validation) and the test numbers it reports."""
    from core.engine.config import FinetuneConfig
    from core.engine.defaults import resolve_finetune
    from core.engine.recipes.finetune import finetune

    model, data = trained_digits_model(sizes["train_epochs"], device)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runs = []
    for i, seed in enumerate(sizes["schedule_seeds"]):
        names = list(SCHEDULES)
        for name in names[i % len(names):] + names[:i % len(names)]:     # rotated: load hits both alike
            fields = {"threat_model": {"kind": "w2-linf", "delta": 0.1}, "seed": seed, **sizes["schedule_config"],
                      **SCHEDULES[name]}
            config = FinetuneConfig.model_validate(fields)
            config = resolve_finetune(config, min(len(data.train_y), config.train_examples or len(data.train_y)))
            model.load_state_dict(start)
            clock = fast_wtrades.TrainClock()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            result = finetune(config, model, data, clock, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            before, after = result.before or {}, result.after or {}
            runs.append({"schedule": name, "seed": seed, "job_s": round(seconds, 2), "train_s": round(clock.seconds, 2),
                         "epochs": int(config.epochs), "attack_steps": config.attack_steps,
                         "attack_schedule": config.attack_schedule, "best_epoch": result.best_epoch,
                         "verdict": result.verdict.name if result.verdict is not None else None,
                         "w2_before": before.get("w2_robust_accuracy"), "w2_after": after.get("w2_robust_accuracy"),
                         "clean_after": after.get("clean_accuracy")})
    summary = {}
    for name in SCHEDULES:
        mine = [r for r in runs if r["schedule"] == name]
        base = {r["seed"]: r for r in runs if r["schedule"] == "default"}
        summary[name] = {
            "job_s_median": statistics.median(r["job_s"] for r in mine),
            "train_s_median": statistics.median(r["train_s"] for r in mine),
            "job_speedup_vs_default": [round(base[r["seed"]]["job_s"] / r["job_s"], 2) for r in mine],
            "train_speedup_vs_default": [round(base[r["seed"]]["train_s"] / max(r["train_s"], 1e-9), 2) for r in mine],
            "w2_after": [r["w2_after"] for r in mine]}
    return {"model": "small-cnn trained on digits", "delta": 0.1, "config": sizes["schedule_config"],
            "runs": runs, "summary": summary}


# --- (d) the live service ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_section(device: torch.device, sizes: dict) -> dict:
    from core.engine.zoo import save_model_file
    from robustify import Client

    model, _ = trained_digits_model(sizes["train_epochs"], torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="robustify-gpu-check-") as tmp:
        path = Path(tmp) / "small-cnn-digits.safetensors"
        save_model_file(model, path)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("ROBUSTIFY_DATABASE_URL", "ROBUSTIFY_BROKER_URL")}
        env.update({"ROBUSTIFY_DATA_DIR": str(Path(tmp) / "data"), "PYTHONPATH": str(ROOT)})
        with open(Path(tmp) / "serve.log", "w") as log:   # the server writes to its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            with Client(f"http://127.0.0.1:{port}", timeout=30, max_retries=0) as client:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"robustify serve exited with {proc.returncode}")
                    try:
                        client.ready()
                        break
                    except Exception:  # noqa: BLE001 - not up yet
                        if time.monotonic() - t0 > sizes["service_start_s"]:
                            raise
                        time.sleep(0.3)
                started = time.monotonic() - t0
                m = client.models.upload(path, architecture="small-cnn", num_classes=10, dataset="digits",
                                         input_shape=(1, 8, 8), name="gpu-check small-cnn")
                client.models.wait(m.id, timeout=120)
                t1 = time.monotonic()
                job = client.jobs.create(type="finetune", model_id=m.id, dataset="digits",
                                         threat_model={"kind": "w2-linf", "delta": 0.1}, config=sizes["finetune"])
                job = client.jobs.wait(job.id, timeout=sizes["job_timeout_s"], poll_interval=0.5)
                result = job.model_dump(mode="json").get("result") or {}
                provenance = result.get("provenance", {}) if isinstance(result, dict) else {}
                out = {"service_start_s": round(started, 2), "job_s": round(time.monotonic() - t1, 2),
                       "job_status": job.status, "job_error": job.model_dump(mode="json").get("error"),
                       "worker_device": provenance.get("device"),
                       "training_precision": provenance.get("training_precision"),
                       "summary": result.get("summary") if isinstance(result, dict) else None}
                if job.status != "succeeded":
                    raise RuntimeError(f"the fine-tune ended {job.status}: {out['job_error']}")
                return out
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- sizes, the table, main ----------------------------------------------------------------------------
def sizes_for(cpu_smoke: bool) -> dict:
    finetune = {"epochs": 1, "train_examples": 256 if cpu_smoke else 1024, "attack_steps": 2 if cpu_smoke else 5,
                "validation_examples": 64 if cpu_smoke else 200, "test_examples": 64 if cpu_smoke else 500,
                "eval_wpgd_steps": 2 if cpu_smoke else 10, "eval_pgd_steps": 1 if cpu_smoke else 5,
                "test_wpgd_steps": 2 if cpu_smoke else 20, "test_pgd_steps": 1 if cpu_smoke else 10,
                "budget_subset": 64 if cpu_smoke else 512,
                # the smoke checks the service's path, not the preset: the standard one's APGD on a loaded
                # 2-core machine took the job past its 60 s
                **({"evaluation": "quick"} if cpu_smoke else {})}
    if cpu_smoke:
        # the smoke's evaluations: the quick preset without the audit (the standard one's adaptive attacks
        # and audit took 74-98 s of the 2-core CI machine under load, for no code path more)
        return {"train_epochs": 1, "n_eval": 64, "wpgd_steps": 3, "throughput_model": "small-cnn",
                "precision_config": {"evaluation": "quick", "audit": False},
                "schedule_seeds": [0], "schedule_config": {
                    "epochs": 1, "train_examples": 160, "validation_examples": 32, "test_examples": 32,
                    "eval_wpgd_steps": 2, "eval_pgd_steps": 1, "test_wpgd_steps": 2, "test_pgd_steps": 1,
                    "budget_subset": 32, "evaluation": "quick"},
                "repeats": 1, "plain": (64, 2, 16, 1, 2), "compiled_repeats": 1, "compiled": (32, 1, 8, 1, 1),
                # torch.compile's graph capture without inductor's code generation (minutes on a CPU)
                "compile_backend": "eager",
                "service_start_s": 60, "job_timeout_s": 60, "finetune": finetune}
    return {"train_epochs": 10, "n_eval": 360, "wpgd_steps": 50, "precision_config": {},
            # the user's defaults (auto epochs, batch and lr; digits: 8 epochs of 71 steps) on all of digits,
            # the quick preset for the test numbers: two seeds of each schedule in about 2 minutes
            "schedule_seeds": [0, 1], "schedule_config": {"evaluation": "quick"},
            "throughput_model": "wide-resnet-28-10", "repeats": 3, "plain": (2000, 10, 512, 2, 10),
            "compiled_repeats": 2, "compiled": (1000, 5, 256, 1, 10), "compile_backend": "inductor",
            "service_start_s": 90, "job_timeout_s": 150, "finetune": finetune}


def summary_table(results: dict) -> str:
    lines = [f"robustify GPU check on {results['device']} (torch {results['torch']}), "
             f"{results['total_seconds']:.0f} s", ""]
    for name, s in results["sections"].items():
        lines.append(f"{name:11s} {'ok' if s['ok'] else 'FAILED'} in {s['seconds']:.1f} s" +
                     ("" if s["ok"] else f": {s['error']}"))
    p = results["sections"].get("precision", {})
    if p.get("ok"):
        default = p["evaluation_default"]
        lines += ["", f"precision (W-PGD, {p['n_examples']} digits, δ={p['delta']}, {p['wpgd_steps']} steps): "
                  f"robust accuracy default {default['robust_accuracy']:.4f} (batch {default['batch_size']}), "
                  f"strict float32 {p['float32_strict']['robust_accuracy']:.4f}, "
                  f"bf16 {p['bf16']['robust_accuracy']:.4f} "
                  f"(float32 stem: {p['bf16_float32_stem']}); default − float32 = {p['default_minus_float32_images']} "
                  f"images, bf16 − float32 = {p['bf16_minus_float32_images']} images"]
    sch = results["sections"].get("schedules", {})
    if sch.get("ok"):
        lines += ["", "schedules (the whole fine-tune, digits CNN, δ=0.1, quick test preset):",
                  "| schedule | seed | epochs × K | job s | training s | W2 before → after | verdict |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in sch["runs"]:
            w2 = (f"{r['w2_before']:.3f} → {r['w2_after']:.3f}" if r["w2_before"] is not None
                  and r["w2_after"] is not None else "—")
            lines.append(f"| {r['schedule']} ({r['attack_schedule']}) | {r['seed']} | {r['epochs']} × "
                         f"{r['attack_steps']} | {r['job_s']:.1f} | {r['train_s']:.1f} | {w2} | {r['verdict']} |")
        a = sch["summary"].get("allocate", {})
        lines.append(f"allocate ÷ default per seed: job {a.get('job_speedup_vs_default')}×, "
                     f"training {a.get('train_speedup_vs_default')}× faster")
    t = results["sections"].get("throughput", {})
    if t.get("ok"):
        lines += ["", t["table"]]
    s = results["sections"].get("service", {})
    if s.get("ok"):
        lines += ["", f"service: up in {s['service_start_s']} s; fine-tune {s['job_status']} in {s['job_s']} s on "
                  f"{s['worker_device']} ({s['training_precision']})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the one GPU check (8 minutes on one H100/H200)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: exercises every code path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-check.json"))
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole check")
    ap.add_argument("--sections", default="precision,schedules,service,throughput",
                    help="in this order: the slowest (throughput, with torch.compile) last")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.deadline
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        ap.error("no CUDA device: run on a GPU machine, or pass --cpu-smoke")
    sizes = sizes_for(args.cpu_smoke)
    results: dict[str, Any] = {**bench_engine.environment(device, os.uname().nodename), "cpu_smoke": args.cpu_smoke,
                               "command": " ".join(["python", "bench/gpu_check.py", *(argv if argv is not None
                                                                                       else sys.argv[1:])]),
                               "sections": {}}
    sections = {"precision": precision_section, "schedules": schedules_section, "throughput": throughput_section,
                "service": service_section}
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in names:
        if name not in sections:
            ap.error(f"unknown section {name!r}; choose from {list(sections)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_section(results, name, functools.partial(sections[name], device, sizes), deadline)
        write_results(results, out, start)        # after every section: a run cut short keeps what it measured
    print(summary_table(results))
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0 if results["ok"] else 1


def write_results(results: dict, out: Path, start: float) -> None:
    """The JSON file and, beside it, the table as text (`<out>.txt`)."""
    results["total_seconds"] = round(time.monotonic() - start, 2)
    results["ok"] = all(s["ok"] for s in results["sections"].values())
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".txt").write_text(summary_table(results) + "\n")


if __name__ == "__main__":
    sys.exit(main())
