"""Sweep jobs against PostgreSQL and Redis: the submit writes the sweep and one queued fine-tune per
value (each its own message), refuses bad lists with a 422 naming them, a cancel cancels the
children, and the sweep ends with its frontier once every child has ended (worker/sweepjob.py's
settle, as the worker's task calls it). The fine-tunes themselves run in tests/e2e/test_sweep_e2e.py."""
from __future__ import annotations

import pytest

from core.service.db import Job, JobEvent
from tests.service.test_models_api import assert_problem
from worker.sweepjob import settle


@pytest.fixture(scope="module")
def ready_model(db, keys) -> str:
    return db.add_model(keys["a"]["id"], status="ready")


def submit_sweep(client, headers, model_id, **over):
    body = {"type": "sweep", "model_id": model_id, "dataset": "digits",
            "threat_model": {"kind": "w2-linf"}, "config": {"epochs": 2}, "seed": 7,
            "sweep": {"delta": [0.05, 0.1, 0.2]}, "recommend": {"maximize": "w2", "max_clean_drop": 0.05}, **over}
    return client.post("/v1/jobs", headers=headers, json=body)


def children(client, headers, sweep_id):
    page = client.get("/v1/jobs", headers=headers, params={"parent_job_id": sweep_id, "limit": 50}).json()
    return sorted(page["data"], key=lambda j: j["threat_model"]["delta"])


def test_submit_writes_the_sweep_and_one_queued_finetune_per_value(client, keys, ready_model, queues, db):
    h = keys["a"]["headers"]
    before = queues.length(queues.gpu)
    resp = submit_sweep(client, h, ready_model, metadata={"team": "x"})
    assert resp.status_code == 202, resp.text
    sweep = resp.json()
    assert sweep["type"] == "sweep" and sweep["status"] == "running" and sweep["parent_job_id"] is None
    assert sweep["config"]["sweep"] == {"delta": [0.05, 0.1, 0.2]}
    assert sweep["config"]["recommend"] == {"maximize": "w2", "max_clean_drop": 0.05}
    kids = children(client, h, sweep["id"])
    assert [k["threat_model"]["delta"] for k in kids] == [0.05, 0.1, 0.2]
    for k in kids:
        assert k["type"] == "finetune" and k["status"] == "queued" and k["parent_job_id"] == sweep["id"]
        assert k["config"]["epochs"] == 2 and k["config"]["seed"] == 7 and k["model_id"] == ready_model
        assert k["metadata"] == {"team": "x", "sweep_values": {"delta": k["threat_model"]["delta"]}}
    # each child is its own message; the sweep has none (no worker runs it)
    assert queues.length(queues.gpu) == before + 3
    sent = " ".join(m["headers"]["argsrepr"] for m in queues.messages(queues.gpu))
    assert all(k["id"] in sent for k in kids) and sweep["id"] not in sent


@pytest.mark.parametrize(("sweep", "words"), [
    ({"delta": []}, "empty list"),
    ({"delta": [0.1, 0.1]}, "twice"),
    ({"delta": [0.0, 0.1]}, "out of range"),
    ({"delta": [0.01 * i for i in range(1, 18)]}, "the limit is 16"),
    ({}, "needs values to sweep"),
    ({"delta": [0.1], "attack_schedule": ["allocate"], "beta": [1.0]}, None),
])
def test_bad_lists_are_422_naming_the_sweep(client, keys, ready_model, sweep, words):
    resp = submit_sweep(client, keys["a"]["headers"], ready_model, sweep=sweep,
                        threat_model={"kind": "w2-linf"} if words else {"kind": "linf"})
    body = assert_problem(resp, 422, "validation_error")
    fields = [e["field"] for e in body["errors"]]
    assert any(f.startswith("sweep") for f in fields), body
    if words:
        assert words in resp.text
    else:   # a combination the recipe refuses names the child's values
        assert "attack_schedule=allocate" in resp.text and "w2-linf or w2-l2" in resp.text


def test_rule_and_type_mismatches_are_422(client, keys, ready_model):
    h = keys["a"]["headers"]
    assert "not measured" in assert_problem(submit_sweep(client, h, ready_model, recommend={"maximize": "l2"}),
                                            422, "validation_error")["detail"]
    body = {"type": "sweep", "model_id": ready_model, "dataset": "digits"}
    assert "a sweep needs `sweep`" in client.post("/v1/jobs", headers=h, json=body).text
    wrong = {"type": "finetune", "model_id": ready_model, "dataset": "digits", "sweep": {"delta": [0.1]}}
    assert "belong to type sweep" in client.post("/v1/jobs", headers=h, json=wrong).text


def test_cancelling_the_sweep_cancels_its_children(client, keys, ready_model, db):
    h = keys["a"]["headers"]
    sweep = submit_sweep(client, h, ready_model).json()
    kids = children(client, h, sweep["id"])
    db.update(Job, kids[1]["id"], status="running", worker_id="w@x")    # one child is running
    out = client.post(f"/v1/jobs/{sweep['id']}/cancel", headers=h).json()
    assert out["status"] == "cancelling"
    assert [k["status"] for k in children(client, h, sweep["id"])] == ["cancelled", "cancelling", "cancelled"]
    db.update(Job, kids[1]["id"], status="cancelled")                   # its worker stopped it
    with db.Session() as s:
        assert settle(s, sweep["id"]) == "cancelled"
        s.commit()
    ended = client.get(f"/v1/jobs/{sweep['id']}", headers=h).json()
    assert ended["status"] == "cancelled" and ended["result"]["counts"]["cancelled"] == 3
    assert ended["result"]["recommendation"]["job_id"] is None
    assert client.post(f"/v1/jobs/{sweep['id']}/cancel", headers=h).json()["status"] == "cancelled"


def _numbers(clean: float, w2: float) -> dict:
    return {"clean_accuracy": clean, "clean_accuracy_ci95": [clean - 0.05, min(1.0, clean + 0.05)],
            "w2_robust_accuracy": w2, "w2_robust_accuracy_ci95": [w2 - 0.05, w2 + 0.05],
            "linf_robust_accuracy": w2 / 2, "linf_robust_accuracy_ci95": [0.0, w2]}


def test_the_last_child_to_end_settles_the_frontier(client, keys, ready_model, db):
    h = keys["a"]["headers"]
    sweep = submit_sweep(client, h, ready_model).json()
    kids = children(client, h, sweep["id"])
    outcomes = [(0.93, 0.40), (0.91, 0.55), (0.80, 0.70)]     # clean drops 0.02, 0.04, 0.15 from 0.95
    # what each child read back from the measurement cache: the first measured, the second reused, the
    # third recorded nothing (a result from before the cache)
    reused = [{"before": False, "corrupted_images": None, "keys": {"before": "k1"}},
              {"before": True, "corrupted_images": None, "keys": {"before": "k1"}}, None]
    for k, (clean, w2), took in zip(kids, outcomes, reused, strict=True):
        with db.Session() as s:
            assert settle(s, sweep["id"]) == "running"   # not every child has ended yet
            s.commit()
        db.update(Job, k["id"], status="succeeded", result={
            "type": "finetune", "improved": True, "model_id": None, "best_checkpoint_id": None,
            "before": _numbers(0.95, 0.2), "after": _numbers(clean, w2),
            "provenance": {"reused": took} if took else {}})
    mid = client.get(f"/v1/jobs/{sweep['id']}", headers=h).json()
    assert mid["status"] == "running" and mid["progress"]["fraction"] == pytest.approx(2 / 3)
    with db.Session() as s:
        assert settle(s, sweep["id"]) == "succeeded"
        s.commit()
    done = client.get(f"/v1/jobs/{sweep['id']}", headers=h).json()
    result = done["result"]
    assert done["status"] == "succeeded" and [p["job_id"] for p in result["points"]] == [k["id"] for k in kids]
    assert [p["pareto"] for p in result["points"]] == [True, True, True]
    rec = result["recommendation"]
    assert rec["job_id"] == kids[1]["id"] and rec["rule"] == {"maximize": "w2", "max_clean_drop": 0.05}
    assert [p["recommended"] for p in result["points"]] == [False, True, False]
    assert db.count(JobEvent, JobEvent.job_id == sweep["id"], JobEvent.type == "status") == 3
    shared = result["shared"]
    assert [(r["job_id"], r["before"], r["before_key"]) for r in shared["children"]] == [
        (kids[0]["id"], False, "k1"), (kids[1]["id"], True, "k1"), (kids[2]["id"], None, None)]
    assert (shared["input_model_measured"], shared["before_reused"], shared["corrupted_images_reused"]) == (1, 1, 0)


def test_cli_submits_shows_and_promotes_a_sweep(capsys, app, client, keys, ready_model, db):
    from cli.main import main
    from tests.service.conftest import LiveServer

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = main([*argv, "--url", live.url, "--key", keys["a"]["key"]])
        return rc, capsys.readouterr().out

    with LiveServer(app) as live:
        rc, out = run("sweep", "submit", "--model", ready_model, "--dataset", "digits", "--delta", "2/255,0.1",
                      "--beta", "1,6", "--max-clean-drop", "0.1", "--set", "epochs=2")
        assert rc == 0 and out.count("  queued  ") == 4 and "delta=0.00784313" in out and "beta=6.0" in out, out
        sweep_id = out.split()[0]
        sweep = client.get(f"/v1/jobs/{sweep_id}", headers=keys["a"]["headers"]).json()
        assert sweep["config"]["recommend"] == {"maximize": "w2", "max_clean_drop": 0.1}
        rc, out = run("sweep", "show", sweep_id)
        assert rc == 0 and out.count("queued") == 4
        listed = children(client, keys["a"]["headers"], sweep_id)
        kids = [k["id"] for k in sorted(listed, key=lambda j: j["created_at"])]
        for k, (clean, w2) in zip(kids, [(0.94, 0.3), (0.93, 0.5), (0.90, 0.6), (0.80, 0.9)], strict=True):
            db.update(Job, k, status="succeeded", result={
                "type": "finetune", "improved": False, "model_id": ready_model, "best_checkpoint_id": None,
                "before": _numbers(0.95, 0.2), "after": _numbers(clean, w2)})
        with db.Session() as s:
            settle(s, sweep_id)
            s.commit()
        rc, out = run("sweep", "show", sweep_id)
        assert rc == 0 and f"recommended: {kids[2]}" in out and out.count("yes") == 4, out
        # a child that handed back its input model promotes to that model
        rc, out = run("sweep", "promote", sweep_id)
        assert rc == 0 and out.startswith(ready_model) and kids[2] in out, out

