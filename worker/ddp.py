"""One fine-tuning job on several devices: DistributedDataParallel ranks started and supervised
by the Celery task that claimed the job.

The task keeps the job's claim and heartbeat. It fills this node's artifact cache with the
job's inputs, then starts one fresh interpreter per device (`python -m worker.ddp`; not forks:
a forked child cannot use CUDA), which meet through a file rendezvous under the cache folder: NCCL on
CUDA (rank r on cuda:r of CUDA_VISIBLE_DEVICES), gloo on the CPU. Every rank loads the model, the
data and the resume state itself and runs core.engine.recipes.finetune with its World; rank 0 alone
reports progress, events and checkpoints and finishes the job, all under the task's owner id,
so the ownership checks of one-device jobs hold unchanged. A cancel seen by rank 0 is agreed by
all ranks at the same step (an all-reduce), so they stop together.

Supervision: the task polls the ranks. All exit 0: rank 0 has finished the job. A rank that
reports an error (an exception: bad input, CUDA out of memory) fails the job with that error, as
on one device. A rank that dies without a report (killed, crashed, its GPU lost) ends the attempt:
the task stops the other ranks and puts the job back in the queue, and the next attempt resumes
from the last checkpoint (attempts are capped as for a lost worker). Ranks die with the task
(PR_SET_PDEATHSIG), so a killed worker leaves no rank behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.errors import ErrorCode, RobustifyError
from core.service.db import Artifact, Dataset, Job, Model
from core.service.settings import Settings
from worker.claim import add_event
from worker.finish import error_of, finish_finetune
from worker.hooks import Heartbeat, LostOwnership
from worker.inputs import set_up_job
from worker.runtime import HOSTNAME, Runtime

log = logging.getLogger("robustify.worker")

_POLL_SECONDS = 0.2
# What a rank reports when it finds the job taken over (not an error of the job: no ErrorCode).
_LOST = "lost"
_STOP_GRACE_SECONDS = 10.0


def devices_for(settings: Settings, job_type: str, config: dict[str, Any] | None) -> int:
    """How many devices a job runs on: its `devices`, else the worker's default (fine-tunes only)."""
    if job_type != "finetune":
        return 1
    return int((config or {}).get("devices") or settings.devices_per_job)


# ------------------------------------------------------------------------------ the task's side
def run_distributed(rt: Runtime, job_id: str, owner: str, hb: Any, devices: int,
                    resume_artifact_id: str | None) -> str:
    """Run the claimed job on `devices` ranks; returns the job's status word (as run_job does)."""
    backend = _check_devices(devices)
    _prefetch(rt, job_id, resume_artifact_id)
    work = _work_dir(rt.settings.resolved_cache_dir / "ddp")
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(devices):  # one by one: a start that fails still stops those running (finally)
            procs.append(subprocess.Popen(  # noqa: PERF401
                [sys.executable, "-m", "worker.ddp", "--job", job_id, "--owner", owner, "--rank", str(rank),
                 "--world", str(devices), "--work", str(work), "--parent", str(os.getpid()),
                 "--resume", resume_artifact_id or ""]))
        with rt.session() as s:
            add_event(s, job_id, "log", f"training on {devices} devices ({backend}, one process each)",
                      {"devices": devices, "backend": backend, "ranks": [f"{HOSTNAME}:{p.pid}" for p in procs]})
            s.commit()
        failed = _supervise(procs, hb)
        if hb.lost:
            raise LostOwnership(job_id)
        if failed is None:
            with rt.session() as s:
                return str(s.scalar(select(Job.status).where(Job.id == job_id)))
        rank, code = failed
        report = _first_report(work) if code > 0 else None
        if report is None:  # killed, crashed: nothing wrong with the job itself
            how = f"signal {-code}" if code < 0 else f"exit status {code} without an error report"
            return _end_attempt(rt, job_id, owner, f"rank {rank} of {devices} died ({how})")
        if report.get("code") == _LOST:
            raise LostOwnership(job_id)
        raise RobustifyError(report["message"], code=report["code"])
    finally:
        _stop(procs)
        shutil.rmtree(work, ignore_errors=True)


def _check_devices(devices: int) -> str:
    """The backend for `devices` ranks here, or not_enough_devices before any process starts: a
    CPU-only worker runs at most one gloo rank per CPU core (worker/devices.py)."""
    from worker.devices import device_capacity

    offered, device_type = device_capacity()
    if offered < devices:
        what = ("GPU(s) (CUDA_VISIBLE_DEVICES)" if device_type == "cuda"
                else "CPU core(s) and no GPU (one rank per core)")
        raise RobustifyError(f"the job asks for {devices} devices but this worker has {offered} {what}; submit it "
                             "with fewer `devices`, or run a worker with more.", code=ErrorCode.NOT_ENOUGH_DEVICES)
    return "nccl" if device_type == "cuda" else "gloo"


def _work_dir(root: Path) -> Path:
    """A fresh folder for one attempt's rendezvous and error reports, named after this process;
    folders left by processes that died (a worker killed before it could clean up) go first."""
    from core.service.process import pid_alive

    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("pid*-*"):
        pid = old.name[3:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=root))


def _prefetch(rt: Runtime, job_id: str, resume_artifact_id: str | None) -> None:
    """Put the job's stored inputs into this node's cache once, before the ranks all read them."""
    from core.storage.artifacts import artifact_relpath

    with rt.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        model = s.get(Model, job.model_id)
        ids = [model.weights_artifact_id if model is not None else None, resume_artifact_id]
        if job.dataset.startswith("ds_"):
            ds = s.get(Dataset, job.dataset)
            ids.append(ds.artifact_id if ds is not None else None)
        arts = [s.get(Artifact, i) for i in ids if i]
    for art in arts:
        if art is not None:
            rt.store.local_path(artifact_relpath(art))


def _supervise(procs: list[subprocess.Popen], hb: Any) -> tuple[int, int] | None:
    """Wait for the ranks; None when all exited 0, else (rank, return code) of the rank to blame:
    the first to fail, preferring one that died without a report (the others then fail in their
    collectives because it is gone)."""
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return None
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad or hb.lost:
            died = [(r, c) for r, c in bad if c < 0]
            return (died or bad or [(0, 0)])[0]
        time.sleep(_POLL_SECONDS)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _first_report(work: Path) -> dict[str, str] | None:
    """The earliest error a rank reported: the cause (the other ranks' errors follow from it, e.g.
    a collective that lost its peer)."""
    reports = sorted(work.glob("rank*.error.json"), key=lambda p: p.stat().st_mtime_ns)
    for path in reports:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


def _end_attempt(rt: Runtime, job_id: str, owner: str, why: str) -> str:
    """Give the job back: queued again, so the next attempt resumes from its last checkpoint."""
    from core.service.queue import enqueue_job
    from worker.celery_app import app

    with rt.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.worker_id != owner:
            raise LostOwnership(job_id)
        job.status, job.heartbeat_at = "queued", None
        add_event(s, job_id, "status", f"attempt {job.attempt} ended: {why}; the job resumes from its last checkpoint",
                  {"status": "queued", "attempt": job.attempt, "reason": why}, level="warning")
        s.commit()
    log.warning("job %s: %s; re-queued", job_id, why)
    enqueue_job(app, job_id)
    return "requeued"


# ------------------------------------------------------------------------------ a rank
def _die_with_parent(parent: int) -> None:
    """SIGKILL this rank when the task's process dies (Linux), and stop now if it already has."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _run_rank(args: argparse.Namespace) -> None:
    """One rank: the job's setup (worker/inputs.py, as on one device), the recipe with this rank's
    World, and on rank 0 the job's end."""
    import torch

    from core.engine.distributed import init_world, shutdown_world
    from core.engine.hooks import Hooks
    from worker.runtime import runtime

    rt = runtime()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(args.rank)
    world = init_world(args.rank, args.world, str(Path(args.work) / "rendezvous"))
    # on an error the rank reports and exits at once (main): no teardown that could wait on dead peers
    hb = Heartbeat(rt, args.job, args.owner)   # not started: the task's heartbeat runs; rank 0 reads cancels
    setup = set_up_job(rt, args.job, args.owner, hb, args.resume or None, reports=world.is_main)
    mine = setup.hooks.as_hooks() if setup.hooks is not None else Hooks()
    agreed = dataclasses.replace(mine, should_stop=lambda: world.any(mine.should_stop()))
    result = setup.finetune(agreed, device=f"cuda:{args.rank}" if cuda else "cpu", world=world)
    if setup.hooks is not None:
        if hb.lost:
            raise LostOwnership(args.job)
        finish_finetune(rt, setup.hooks, result)
    shutdown_world(world)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.ddp", description="one rank of a multi-device job")
    for name in ("--job", "--owner", "--work", "--resume"):
        p.add_argument(name, required=True)
    for name in ("--rank", "--world", "--parent"):
        p.add_argument(name, type=int, required=True)
    args = p.parse_args(argv)
    _die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format=f"[rank {args.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        _run_rank(args)
        return 0
    except LostOwnership:
        report: dict[str, str] = {"code": _LOST, "message": "another worker took the job over"}
        code = 3
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the task
        report = {**error_of(exc), "traceback": "".join(traceback.format_exception(exc))[-20000:]}
        log.error("rank %d failed: %s", args.rank, report["traceback"])
        code = 1
    Path(args.work, f"rank{args.rank}.error.json").write_text(json.dumps(report))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no process-group teardown: it could wait forever on a peer that is gone


if __name__ == "__main__":
    sys.exit(main())
