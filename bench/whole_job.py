"""The whole fine-tune job as a user waits for it: submit → succeeded through the real service.

    OMP_NUM_THREADS=1 python bench/whole_job.py --datasets digits,fashion-mnist --seeds 0,1,2 \
        --out bench/results/whole-job.json
    OMP_NUM_THREADS=1 python bench/whole_job.py --quick        # digits, 1 seed, 1 epoch: a smoke run

It starts `robustify serve` (the embedded default: SQLite, the server-less broker, one job worker)
in a temporary data folder, and for every data set and seed:
- trains a small CNN with plain cross-entropy (the same input model for every method of that seed),
  uploads it over HTTP and waits until it is validated;
- submits one fine-tune job per method (`METHODS`), the methods in an order rotated per seed so that
  a change of machine load hits all of them alike, one job at a time, and times it from the
  `POST /v1/jobs` to the moment the job reads `succeeded`;
- splits that time into phases from the job's events (each status and phase change is an event
  with its time): queue (submit → running), data (running → the first phase: the data set, the
  model and the splits are loaded), validation (every "evaluate" phase: epoch 0 and each epoch's),
  training ("train", the Ῡ estimate and the per-epoch checkpoints included), final evaluation and
  artifacts ("test: …" → succeeded: the before/after, the report, the plot and the checkpoint rows).
A warm-up job (one epoch, untimed) runs first, so that no method pays the worker's first imports.
The worker's measurement cache is emptied before every timed job, so each one measures its input
model itself, as a user's first job on a model does (each row's `reused` says what it read back).

Robustness is the job's own final evaluation: the before/after of the best checkpoint on the test
split (images that chose no setting), measured by the W2 attack ensemble of the "standard" preset
(core.engine.evaluation.ensemble: W-PGD with ReDLR, with cross-entropy and from a random start,
run to convergence, and the pointwise set as a member) and the pointwise attacks (APGD-CE + APGD-T
on a CPU). Every method uses the same preset, so the final evaluation costs the same for all; the
table reports each accuracy with its n and 95 % Wilson interval, and the W2 difference to today's
default per seed (median, worst).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

# "default-k10": the paper's schedule, K = 10 inner W-PGD steps (the recipe's default before this
# benchmark; pinned, so the row means the same when the defaults move). "allocate": fast W-TRADES's
# one-gradient schedule. "new-default": whatever FinetuneConfig's defaults are now.
METHODS: dict[str, dict[str, Any]] = {
    "default-k10": {"attack_schedule": "standard", "attack_steps": 10},
    "allocate": {"attack_schedule": "allocate"},
    "new-default": {},
}
THREAT = {"kind": "w2-linf", "delta": 0.1}
# Per data set: the input model's training (epochs of plain cross-entropy) and the job's images.
SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"shape": (1, 8, 8), "pretrain_epochs": 5, "config": {"epochs": 8}},
    "fashion-mnist": {"shape": (1, 28, 28), "pretrain_epochs": 2, "train_examples": 4000,
                      "config": {"epochs": 4, "train_examples": 4000, "test_examples": 1000}},
}
PHASES = ("queue", "data", "validation", "training", "final evaluation")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`robustify serve` in its own process group, on a free port and a fresh data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.port = _free_port()
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
        env.update({"ROBUSTIFY_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
        self.log = open(data_dir / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        exe = Path(sys.executable).with_name("robustify")
        self.proc = subprocess.Popen([str(exe), "serve", "--port", str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"robustify serve exited; see {data_dir / 'serve.log'}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("robustify serve did not become ready in 180 s")

    def stop(self) -> None:
        self.client.close()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def wait(self, path: str, done: Any, timeout: float, interval: float = 0.25) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body: dict[str, Any] = self.client.get(path).json()
            if done(body):
                return body
            time.sleep(interval)
        raise SystemExit(f"timed out waiting on {path}")


def train_input_model(dataset: str, seed: int, folder: Path, datasets_dir: Path) -> Path:
    import torch

    from core.engine.data.datasets import load_dataset
    from core.engine.data.sampling import stratified_indices
    from core.engine.recipes.standard import train_standard
    from core.engine.zoo import create_model, save_model_file

    setting = SETTINGS[dataset]
    data = load_dataset(dataset, data_dir=datasets_dir)
    if setting.get("train_examples"):   # the input model sees a seeded stratified sample of the training images
        keep = torch.as_tensor(stratified_indices(data.train_y.numpy(), setting["train_examples"], seed))
        data = replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])
    torch.manual_seed(seed)
    c, h, _ = setting["shape"]
    model = create_model("small-cnn", num_classes=10, in_channels=c, image_size=h, dataset=dataset)
    model = train_standard(model, data, epochs=setting["pretrain_epochs"], seed=seed)
    path = folder / f"{dataset}-seed{seed}.safetensors"
    save_model_file(model, path)
    return path


def upload(svc: Service, path: Path, dataset: str) -> str:
    c, h, w = SETTINGS[dataset]["shape"]
    with open(path, "rb") as fh:
        r = svc.client.post("/v1/models", files={"file": (path.name, fh, "application/octet-stream")},
                            data={"architecture": "small-cnn", "num_classes": "10", "dataset": dataset,
                                  "input_shape": f"{c},{h},{w}", "name": path.stem})
    r.raise_for_status()
    model_id: str = r.json()["id"]
    model = svc.wait(f"/v1/models/{model_id}", lambda m: m["status"] in ("ready", "rejected"), 300)
    if model["status"] != "ready":
        raise SystemExit(f"model {path.name} was rejected: {model.get('error')}")
    return model_id


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def phase_seconds(submitted: float, events: list[dict[str, Any]], finished: float) -> dict[str, float]:
    """Seconds per phase (PHASES) from the job's events: each status or phase event opens a phase
    that lasts until the next one."""
    marks: list[tuple[float, str]] = [(submitted, "queue")]
    for e in events:
        message = str(e.get("message", ""))
        at = _ts(e["created_at"])
        if e.get("type") == "status" and (e.get("data") or {}).get("status") == "running" \
                and marks[-1][1] == "queue":
            marks.append((at, "data"))
        elif e.get("type") == "progress" and message.startswith("phase: "):
            phase = message.removeprefix("phase: ")
            name = ("validation" if phase == "evaluate" else "final evaluation" if phase.startswith("test")
                    else "training")
            marks.append((at, name))
    out = dict.fromkeys(PHASES, 0.0)
    for (start, name), (end, _) in zip(marks, [*marks[1:], (finished, "")], strict=True):
        out[name] += max(0.0, end - start)
    return {k: round(v, 2) for k, v in out.items()}


def empty_measurement_cache(data_dir: Path) -> None:
    """Delete the measurement cache of `robustify serve --data-dir data_dir` (worker/measurecache.py:
    named entries in the artifact directory; deleting them costs later jobs only a measurement)."""
    from core.service.settings import Settings
    from worker.measurecache import PREFIX

    shutil.rmtree(Settings(data_dir=data_dir).resolved_artifact_dir / PREFIX, ignore_errors=True)


def run_job(svc: Service, model_id: str, dataset: str, method: str, seed: int) -> dict[str, Any]:
    config = {**SETTINGS[dataset]["config"], **METHODS[method], "seed": seed}
    # every timed job measures its input model itself: the worker's measurement cache would hand
    # the second method of a seed the first one's before-measurement (about a third of the final
    # evaluation), and the comparison would time the cache, not the method
    empty_measurement_cache(svc.data_dir)
    t0 = time.time()
    r = svc.client.post("/v1/jobs", json={"type": "finetune", "model_id": model_id, "dataset": dataset,
                                          "threat_model": THREAT, "config": config, "seed": seed})
    if r.status_code >= 400:
        raise SystemExit(f"{method}: the job was refused: {r.text}")
    job_id = r.json()["id"]
    job = svc.wait(f"/v1/jobs/{job_id}", lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 6 * 3600)
    wall = time.time() - t0
    if job["status"] != "succeeded":
        raise SystemExit(f"{method} seed {seed}: the job ended {job['status']}: {job.get('error')}")
    events = svc.client.get(f"/v1/jobs/{job_id}/events", params={"after": 0, "limit": 1000}).json()["data"]
    result = job["result"]
    after = result.get("after") or {}
    return {"method": method, "seed": seed, "job_id": job_id, "wall_seconds": round(wall, 2),
            "phases": phase_seconds(t0, events, t0 + wall), "epochs_run": len(result.get("history") or []),
            "best_epoch": result.get("best_epoch"), "verdict": result.get("verdict"),
            "config": config,
            "after": {k: after.get(k) for k in ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy",
                                                 "clean_accuracy_ci95", "w2_robust_accuracy_ci95",
                                                 "linf_robust_accuracy_ci95", "n_examples")},
            "before_w2": (result.get("before") or {}).get("w2_robust_accuracy"),
            "reused": (result.get("provenance") or {}).get("reused")}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data set and method: job time, its ratio to default-k10's of the same seed, the phases
    (median over seeds), and the W2 difference to default-k10's per seed."""
    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        base = {r["seed"]: r for r in rows if r["dataset"] == dataset and r["method"] == "default-k10"}
        for method in METHODS:
            mine = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not mine:
                continue
            ratios = [base[r["seed"]]["wall_seconds"] / r["wall_seconds"] for r in mine if r["seed"] in base]
            dw2 = [r["after"]["w2_robust_accuracy"] - base[r["seed"]]["after"]["w2_robust_accuracy"]
                   for r in mine if r["seed"] in base]
            dclean = [r["after"]["clean_accuracy"] - base[r["seed"]]["after"]["clean_accuracy"]
                      for r in mine if r["seed"] in base]
            out.append({
                "dataset": dataset, "method": method, "seeds": [r["seed"] for r in mine],
                "job_seconds_median": round(statistics.median(r["wall_seconds"] for r in mine), 1),
                "speedup_vs_default_k10": [round(min(ratios), 2), round(statistics.median(ratios), 2),
                                           round(max(ratios), 2)] if ratios else None,
                "phases_median": {p: round(statistics.median(r["phases"][p] for r in mine), 1) for p in PHASES},
                "w2_after": [r["after"]["w2_robust_accuracy"] for r in mine],
                "w2_diff_vs_default_k10": [round(min(dw2), 4), round(statistics.median(dw2), 4)] if dw2 else None,
                "clean_diff_vs_default_k10": [round(min(dclean), 4), round(statistics.median(dclean), 4)]
                if dclean else None,
                "n_test": mine[0]["after"]["n_examples"],
            })
    return out


def table(summary: list[dict[str, Any]]) -> str:
    head = ("| data set | method | job s (median) | speed-up vs K=10 (min/median/max) | queue | data | validation | "
            "training | final eval + artifacts | W2 after, per seed | ΔW2 vs K=10 (worst, median) | n |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        p = s["phases_median"]
        sp = "/".join(f"{v:.2f}" for v in s["speedup_vs_default_k10"]) if s["speedup_vs_default_k10"] else "-"
        dw = "/".join(f"{v:+.3f}" for v in s["w2_diff_vs_default_k10"]) if s["w2_diff_vs_default_k10"] else "-"
        w2 = ", ".join(f"{w:.3f}" for w in s["w2_after"])
        lines.append(f"| {s['dataset']} | {s['method']} | {s['job_seconds_median']} | {sp}× | {p['queue']} | "
                     f"{p['data']} | {p['validation']} | {p['training']} | {p['final evaluation']} | {w2} | {dw} | "
                     f"{s['n_test']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="digits,fashion-mnist")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="digits, seed 0, 1 epoch, every method: a smoke run")
    ap.add_argument("--out", type=Path, help="write the rows and the summary as JSON here")
    args = ap.parse_args(argv)
    datasets = ["digits"] if args.quick else args.datasets.split(",")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS] + [d for d in datasets if d not in SETTINGS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)} (methods: {', '.join(METHODS)}; data sets: {', '.join(SETTINGS)})")
    if args.quick:
        for s in SETTINGS.values():
            s["config"] = {**s["config"], "epochs": 1, "test_examples": 60, "evaluation": "quick"}
    workdir = Path(tempfile.mkdtemp(prefix="robustify-whole-job-"))
    rows: list[dict[str, Any]] = []
    svc = Service(workdir)
    try:
        datasets_dir = workdir / "datasets"
        for dataset in datasets:
            for i, seed in enumerate(seeds):
                model_id = upload(svc, train_input_model(dataset, seed, workdir, datasets_dir), dataset)
                if not rows:   # warm-up: the worker's first job pays its imports; not timed
                    warm = svc.client.post("/v1/jobs", json={
                        "type": "finetune", "model_id": model_id, "dataset": dataset, "threat_model": THREAT,
                        "config": {"epochs": 1, "train_examples": 200, "test_examples": 50, "evaluation": "quick"}})
                    warm.raise_for_status()
                    svc.wait(f"/v1/jobs/{warm.json()['id']}",
                             lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 1800)
                order = methods[i % len(methods):] + methods[:i % len(methods)]
                for method in order:
                    row = {"dataset": dataset, **run_job(svc, model_id, dataset, method, seed)}
                    rows.append(row)
                    write(args.out, rows)
                    print(f"{dataset} seed {seed} {method}: {row['wall_seconds']:.1f} s, phases {row['phases']}, "
                          f"W2 after {row['after']['w2_robust_accuracy']:.3f}", flush=True)
    finally:
        svc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(summarise(rows)))
    return 0


def write(out: Path | None, rows: list[dict[str, Any]]) -> None:
    """The rows so far and their summary, as JSON (after every job: a run stopped early keeps them)."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "omp_threads": os.environ.get("OMP_NUM_THREADS")},
                               "threat": THREAT, "methods": METHODS, "settings": SETTINGS,
                               "rows": rows, "summary": summarise(rows)}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
