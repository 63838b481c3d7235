"""The embedded default end to end: `robustify serve` with nothing configured but a data folder
(SQLite database, kombu's SQLAlchemy broker on SQLite, artifacts on disk, auth off on localhost)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import free_port, run_finetune_flow, start_serve, upload_model, wait_model_ready, wait_until

pytestmark = pytest.mark.timeout(240)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        children = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        out += [int(c) for c in children]
        todo += [int(c) for c in children]
    return out


def test_serve_runs_a_job_on_the_embedded_default(tmp_path: Path, digits_model_file: Path) -> None:
    serve, url, log_path, data_dir = start_serve(tmp_path)
    try:
        assert f"robustify serving on {url}" in log_path.read_text()

        with httpx.Client(base_url=url, timeout=30) as client:  # no API key: auth is off on localhost
            model = wait_model_ready(client, upload_model(client, digits_model_file)["id"])
            # the same flow as the distributed deployment's: SSE, progress, checkpoints, a more robust model
            run_finetune_flow(client, url, model["id"], digits_model_file, tmp_path, epochs=5)
        assert (data_dir / "robustify.db").is_file() and (data_dir / "broker.db").is_file()
        assert any((data_dir / "artifacts").rglob("*"))
    finally:
        worker_pids = _descendants(serve.pid)
        serve.send_signal(signal.SIGTERM)
        try:
            rc = serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            raise
    # a clean stop: exit code 0 and the worker processes gone with it
    assert rc == 0, log_path.read_text()[-3000:]
    assert "robustify stopped." in log_path.read_text()
    assert worker_pids, "serve started no worker process"
    wait_until(lambda: not any(_alive(p) for p in worker_pids), 10, "the worker processes to exit")


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`robustify demo` (the README's first command), shortened to 2 epochs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    data_dir = tmp_path / "demo-data"
    proc = subprocess.run([sys.executable, "-m", "cli", "demo", "--data-dir", str(data_dir), "--port",
                           str(free_port()), "--epochs", "2"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=170)
    out = proc.stdout.replace("\r", "\n")
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert step in out
    assert "verified" in out and "W2 robust accuracy" in out and "robustify serve" in out
    weights = data_dir / "demo" / "robust-small-cnn-digits.safetensors"
    from core.zoo import load_model_file

    load_model_file(weights, "small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")
