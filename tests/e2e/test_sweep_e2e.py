"""A sweep job end to end through the HTTP API: three δ values on digits, each an ordinary fine-tune.

- On the embedded default (`robustify serve`: SQLite, the SQLite broker, one worker): the sweep
  ends with one frontier point per child, the recommended child satisfies the stated rule and is
  promoted to a model; its children made the corrupted test images and measured the input model on
  them once (result.shared), while each measured the input model at its own δ; a β sweep at one δ
  measures the input model once; a second sweep cancelled while its first child trains ends
  cancelled with every child cancelled.
- On PostgreSQL + Redis with two workers: the children spread over both; the prefork child running
  one of them is killed mid-run and the fine-tune resumes from its checkpoint (attempt 2), and the
  sweep still ends with its frontier.
- On Fashion-MNIST (28×28, Debian's dataset-fashion-mnist), a sweep over the same three δ values
  finishes with its frontier on both: the embedded default and PostgreSQL + Redis with two workers.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (
    TINY,
    EmbeddedServe,
    Workers,
    events,
    upload_model,
    wait_model_ready,
    wait_status,
    wait_until,
)

pytestmark = pytest.mark.timeout(420)

DELTAS = [0.05, 0.1, 0.2]
RULE = {"maximize": "w2", "max_clean_drop": 0.2}
CORRUPTIONS = {"types": ["gaussian_noise"], "severities": [1, 5]}
FINAL = {"succeeded", "failed", "cancelled"}


def submit_sweep(client: httpx.Client, model_id: str, sweep: dict[str, Any] | None = None,
                 threat: dict[str, Any] | None = None, dataset: str = "digits", **config: Any) -> dict[str, Any]:
    body = {"type": "sweep", "model_id": model_id, "dataset": dataset, "threat_model": threat or {"kind": "w2-linf"},
            "config": {**TINY, "epochs": 2, "evaluation": "quick", "test_examples": 100, **config},
            "sweep": sweep or {"delta": DELTAS}, "recommend": RULE}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def children(client: httpx.Client, sweep_id: str) -> list[dict[str, Any]]:
    page = client.get("/v1/jobs", params={"parent_job_id": sweep_id, "limit": 50}).json()
    return sorted(page["data"], key=lambda j: j["threat_model"]["delta"])


def check_frontier(client: httpx.Client, sweep: dict[str, Any]) -> dict[str, Any]:
    """One point per child, each with its intervals; the recommended child satisfies the rule and
    is the most W2-robust of those that do."""
    kids = children(client, sweep["id"])
    assert [k["threat_model"]["delta"] for k in kids] == DELTAS and all(k["status"] == "succeeded" for k in kids)
    result = sweep["result"]
    points = result["points"]
    assert [p["job_id"] for p in points] == [k["id"] for k in kids] and [p["delta"] for p in points] == DELTAS
    for p in points:
        low, high = p["w2_robust_accuracy_ci95"]
        assert low <= p["w2_robust_accuracy"] <= high and len(p["clean_accuracy_ci95"]) == 2
        assert p["before"]["clean_accuracy"] is not None and p["clean_drop"] is not None
    assert any(p["pareto"] for p in points)
    rec = result["recommendation"]
    assert rec["rule"] == RULE, rec
    fits = [p for p in points if p["clean_drop"] <= RULE["max_clean_drop"] + 1e-12]
    assert rec["satisfied_by"] == [p["job_id"] for p in fits]
    if not fits:   # said, not silently empty
        assert rec["job_id"] is None and "no child satisfies" in rec["reason"]
        return {}
    chosen = next(p for p in points if p["job_id"] == rec["job_id"])
    assert chosen["recommended"] and chosen["satisfies_rule"]
    assert chosen["w2_robust_accuracy"] == max(p["w2_robust_accuracy"] for p in fits)
    return chosen


def test_a_sweep_finishes_and_cancels_on_the_embedded_default(tmp_path: Path, digits_model_file: Path) -> None:
    with EmbeddedServe(tmp_path, {"ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3"}) as serve, \
            httpx.Client(base_url=serve.url, timeout=30) as client:
        model = wait_model_ready(client, upload_model(client, digits_model_file)["id"])
        sweep = submit_sweep(client, model["id"], corruptions=CORRUPTIONS)
        assert sweep["status"] == "running" and len(children(client, sweep["id"])) == 3
        done = wait_status(client, sweep["id"], FINAL, 300)
        assert done["status"] == "succeeded", done
        assert done["progress"]["fraction"] == 1.0
        chosen = check_frontier(client, done)
        # one worker runs the children one after another: the first makes the corrupted images and measures
        # the input model on them, the later ones read both back; the before numbers depend on δ, so every
        # child measures the input model at its own δ
        shared = done["result"]["shared"]
        assert [r["job_id"] for r in shared["children"]] == done["result"]["children"]
        assert [(r["before"], r["corrupted_images"], r["input_corruptions"]) for r in shared["children"]] == [
            (False, False, False), (False, True, True), (False, True, True)], shared
        assert shared["input_model_measured"] == 3 and shared["corrupted_images_reused"] == 2
        assert len({r["before_key"] for r in shared["children"]}) == 3
        kids = {k["id"]: k for k in children(client, done["id"])}
        assert all(kids[r["job_id"]]["result"]["provenance"]["reused"]["corrupted_images"] == r["corrupted_images"]
                   for r in shared["children"])

        # a β sweep at one δ: the second child reads the input model's before-measurement back
        betas = submit_sweep(client, model["id"], {"beta": [1.0, 3.0]}, {"kind": "w2-linf", "delta": 0.1}, epochs=1,
                             test_examples=60, validation_examples=60, train_examples=300)
        ended = wait_status(client, betas["id"], FINAL, 120)
        assert ended["status"] == "succeeded", ended
        shared = ended["result"]["shared"]
        assert [r["before"] for r in shared["children"]] == [False, True], shared
        assert shared["input_model_measured"] == 1 and shared["before_reused"] == 1
        first, second = (client.get(f"/v1/jobs/{r['job_id']}").json()["result"] for r in shared["children"])
        assert second["before"] == first["before"], "the reused numbers are the measured ones"
        assert second["provenance"]["reused"]["keys"]["before"] == first["provenance"]["reused"]["keys"]["before"]
        if chosen:
            promoted = client.post(f"/v1/jobs/{chosen['job_id']}/promote")
            assert promoted.status_code in (200, 201), promoted.text
            assert promoted.json()["status"] == "ready"
            assert promoted.json()["id"] == client.get(f"/v1/jobs/{chosen['job_id']}").json()["result"]["model_id"]

        # cancelled while its first fine-tune trains: that one stops, the queued ones never start
        second = submit_sweep(client, model["id"], epochs=20)
        first = children(client, second["id"])[0]
        wait_until(lambda: any(e["type"] == "checkpoint" for e in events(client, first["id"])), 120,
                   "the first child's first checkpoint")
        assert client.post(f"/v1/jobs/{second['id']}/cancel").json()["status"] == "cancelling"
        ended = wait_status(client, second["id"], FINAL, 60)
        assert ended["status"] == "cancelled", ended
        assert [k["status"] for k in children(client, second["id"])] == ["cancelled"] * 3
        assert ended["result"]["recommendation"]["job_id"] is None


@pytest.mark.service
@pytest.mark.timeout(600)
def test_a_sweep_spreads_over_two_workers_and_a_killed_child_resumes(
        client: httpx.Client, ready_model: dict[str, Any], workers: Workers, queues: dict[str, str],
        fashion_model_file: Path) -> None:
    procs = [workers.start(queues["gpu"], f"gpu-sweep-{i}") for i in range(2)]
    sweep = submit_sweep(client, ready_model["id"])   # two epochs: the kill lands in the second or the final test
    kids = children(client, sweep["id"])
    fashion = submit_fashion_sweep(client, fashion_model_file)   # queued behind the digits children

    def a_checkpoint() -> dict[str, Any] | None:
        return next((k for k in kids if any(e["type"] == "checkpoint" for e in events(client, k["id"]))), None)

    victim = wait_until(a_checkpoint, 120, "a child's first checkpoint")
    starts = [e for e in events(client, victim["id"]) if e["type"] == "status" and e["data"].get("status") == "running"]
    os.kill(int(starts[-1]["data"]["worker_id"].rsplit(":", 1)[1]), signal.SIGKILL)   # the pool child running it
    done = wait_status(client, sweep["id"], FINAL, 360)
    assert done["status"] == "succeeded", done
    resumed = client.get(f"/v1/jobs/{victim['id']}").json()
    assert resumed["status"] == "succeeded" and resumed["attempt"] == 2, resumed
    assert any("resumed_from_epoch" in (e["data"] or {}) for e in events(client, victim["id"]))
    # both workers ran children: a job's worker_id is the pool process (host:pid), which its worker's log names
    claims = {k["id"]: {e["data"]["worker_id"] for e in events(client, k["id"])
                        if e["type"] == "status" and e["data"].get("status") == "running"} for k in kids}
    ran = [[job for job, pids in claims.items() if any(f"job {job} claimed by {pid}" in workers.log(p) for pid in pids)]
           for p in procs]
    assert all(ran) and set().union(*ran) == set(claims), (ran, claims)
    assert all(p.poll() is None for p in procs)
    check_frontier(client, done)
    fashion_done = check_fashion_sweep(client, fashion, 240)
    assert fashion_done["result"]["counts"] == {"succeeded": 3, "failed": 0, "cancelled": 0}


# Fashion-MNIST: every child trains on 500 of its 60,000 training images for one epoch and is measured
# on 100 test images (each a stratified sample), enough for a frontier with intervals
FASHION = {"epochs": 1, "train_examples": 500, "validation_examples": 100, "test_examples": 100}


def submit_fashion_sweep(client: httpx.Client, model_file: Path) -> dict[str, Any]:
    model = wait_model_ready(client, upload_model(client, model_file, "fashion-mnist")["id"], timeout=120)
    assert model["dataset"] == "fashion-mnist", model
    return submit_sweep(client, model["id"], dataset="fashion-mnist", **FASHION)


def check_fashion_sweep(client: httpx.Client, sweep: dict[str, Any], timeout: float) -> dict[str, Any]:
    done = wait_status(client, sweep["id"], FINAL, timeout)
    assert done["status"] == "succeeded", done
    kids = children(client, done["id"])
    for kid in kids:
        assert kid["dataset"] == "fashion-mnist" and kid["result"]["provenance"]["examples"]["test"] == 100, kid
        # every class in the 100 test images of a data set stored in class order
        assert len(kid["result"]["after"]["per_class"]) == 10
    check_frontier(client, done)
    return done


def test_a_fashion_mnist_sweep_finishes_on_the_embedded_default(tmp_path: Path, fashion_model_file: Path) -> None:
    with EmbeddedServe(tmp_path) as serve, httpx.Client(base_url=serve.url, timeout=30) as client:
        check_fashion_sweep(client, submit_fashion_sweep(client, fashion_model_file), 300)
