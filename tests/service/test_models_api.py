"""POST/GET/DELETE /v1/models against PostgreSQL and Redis: uploads, validation, ownership."""
from __future__ import annotations

import hashlib

import pytest

from core.service.db import Artifact, Job, Model
from tests.service.conftest import LiveServer, store_files
from tests.service.payloads import multipart_body, pickle_bytes, safetensors_bytes, torch_zip_bytes

FIELDS = {"architecture": "small-cnn", "num_classes": "10", "dataset": "digits"}


def upload(client, headers, data: bytes, fields=None, filename="model.safetensors"):
    return client.post("/v1/models", headers=headers, data=fields or FIELDS,
                       files={"file": (filename, data, "application/octet-stream")})


def assert_problem(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"].endswith(code) and body["title"] and body["detail"] and body["instance"]
    return body


def test_upload_stores_weights_and_enqueues_validation(client, keys, queues, db, settings):
    data = safetensors_bytes()
    resp = upload(client, keys["a"]["headers"], data, {**FIELDS, "name": "cnn", "metadata": '{"team": "x"}'})
    assert resp.status_code == 201, resp.text
    m = resp.json()
    assert m["object"] == "model" and m["status"] == "validating" and m["source"] == "upload"
    assert m["input_shape"] == [1, 8, 8] and m["metadata"] == {"team": "x"} and m["name"] == "cnn"
    assert m["sha256"] == hashlib.sha256(data).hexdigest() and m["size"] == len(data)
    # The validation message really is in Redis, on the CPU queue, carrying only the id.
    msgs = queues.messages(queues.cpu)
    assert any(msg["headers"]["task"] == "robustify.validate_model" and m["id"] in msg["headers"]["argsrepr"]
               for msg in msgs)
    assert db.get(Model, m["id"]).owner_key_id == keys["a"]["id"]
    assert not list((settings.resolved_artifact_dir / "tmp").glob("*"))  # the temp file was moved

    got = client.get(f"/v1/models/{m['id']}", headers=keys["a"]["headers"])
    assert got.status_code == 200 and got.json()["id"] == m["id"]
    content = client.get(f"/v1/models/{m['id']}/content", headers=keys["a"]["headers"])
    assert content.status_code == 200 and content.content == data
    assert content.headers["etag"] == f'"{m["sha256"]}"'
    assert "attachment" in content.headers["content-disposition"]


def test_robustbench_registration(client, keys, queues):
    before = queues.length(queues.cpu)
    resp = client.post("/v1/models", headers=keys["a"]["headers"],
                       json={"source": "robustbench", "name": "Wang2023Better_WRN-28-10", "dataset": "cifar10",
                             "threat_model": "Linf"})
    assert resp.status_code == 201, resp.text
    m = resp.json()
    assert m["architecture"] == "robustbench:Wang2023Better_WRN-28-10" and m["status"] == "validating"
    assert m["urls"]["content"] is None
    assert queues.length(queues.cpu) == before + 1
    # no weights until the worker has fetched and checked them
    assert_problem(client.get(f"/v1/models/{m['id']}/content", headers=keys["a"]["headers"]), 409, "model_not_ready")
    bad = client.post("/v1/models", headers=keys["a"]["headers"], json={"source": "robustbench", "name": "x",
                                                                         "threat_model": "L7"})
    body = assert_problem(bad, 422, "validation_error")
    assert "threat_model" in body["detail"]


@pytest.mark.parametrize("payload, code, words", [
    (pickle_bytes(), "invalid_model_file", "pickle"),
    (torch_zip_bytes(), "invalid_model_file", "arbitrary code"),
    (safetensors_bytes()[:-7], "invalid_model_file", "truncated"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "invalid_model_file", "JSON"),
])
def test_bad_weights_are_refused_and_nothing_is_stored(client, keys, db, settings, queues, payload, code, words):
    rows, arts, files = db.count(Model), db.count(Artifact), store_files(settings)
    queued = queues.length(queues.cpu)
    body = assert_problem(upload(client, keys["a"]["headers"], payload), 422, code)
    assert words in body["detail"]
    assert db.count(Model) == rows and db.count(Artifact) == arts
    assert store_files(settings) == files and queues.length(queues.cpu) == queued


def test_unknown_architecture_and_bad_fields(client, keys, db, settings):
    rows, arts, files = db.count(Model), db.count(Artifact), store_files(settings)
    h = keys["a"]["headers"]
    body = assert_problem(upload(client, h, safetensors_bytes(), {**FIELDS, "architecture": "resnet-9000"}),
                          422, "unsupported_architecture")
    assert "small-cnn" in body["detail"]
    body = assert_problem(upload(client, h, safetensors_bytes(), {**FIELDS, "num_classes": "1"}),
                          422, "validation_error")
    assert body["errors"][0]["field"] == "num_classes"
    body = assert_problem(upload(client, h, safetensors_bytes(), {**FIELDS, "dataset": "imagenet-ish"}),
                          422, "validation_error")
    assert body["errors"][0]["field"] == "input_size"
    assert db.count(Model) == rows and db.count(Artifact) == arts and store_files(settings) == files


def test_oversize_upload_with_content_length_is_413(client, keys, db, settings):
    rows, files = db.count(Model), store_files(settings)
    big = b"\0" * (settings.max_upload_bytes + 1)
    body = assert_problem(upload(client, keys["a"]["headers"], big), 413, "payload_too_large")
    assert str(settings.max_upload_bytes) in body["detail"]
    assert db.count(Model) == rows and store_files(settings) == files


def test_oversize_chunked_upload_without_content_length_is_413(app, keys, db, settings):
    """Real HTTP through uvicorn: the body is sent chunked, so only counting can stop it."""
    import httpx

    rows, files = db.count(Model), store_files(settings)
    body, ctype = multipart_body(FIELDS, b"\1" * (settings.max_upload_bytes + 4096))

    def chunks():
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    with LiveServer(app) as live:
        resp = httpx.post(f"{live.url}/v1/models", content=chunks(),
                          headers={**keys["a"]["headers"], "Content-Type": ctype}, timeout=30)
        assert_problem(resp, 413, "payload_too_large")
        # A chunked upload under the cap still works.
        small, ctype = multipart_body(FIELDS, safetensors_bytes(seed=5))
        ok = httpx.post(f"{live.url}/v1/models", content=iter([small[:100], small[100:]]),
                        headers={**keys["a"]["headers"], "Content-Type": ctype}, timeout=30)
        assert ok.status_code == 201, ok.text
    assert db.count(Model) == rows + 1 and len(store_files(settings)) == len(files) + 1


def test_unsupported_media_type(client, keys):
    assert_problem(client.post("/v1/models", headers={**keys["a"]["headers"], "Content-Type": "text/plain"},
                               content=b"hello"), 415, "unsupported_media_type")


def test_auth_missing_wrong_and_other_keys_resources(client, keys):
    resp = client.get("/v1/models")
    body = assert_problem(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert "robustify keys create" in body["detail"]
    assert_problem(client.get("/v1/models", headers={"Authorization": "Bearer rk_wrong"}), 401, "unauthorized")
    assert_problem(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401, "unauthorized")

    mine = upload(client, keys["a"]["headers"], safetensors_bytes(seed=2)).json()["id"]
    assert_problem(client.get(f"/v1/models/{mine}", headers=keys["b"]["headers"]), 404, "not_found")
    assert_problem(client.get(f"/v1/models/{mine}/content", headers=keys["b"]["headers"]), 404, "not_found")
    assert_problem(client.delete(f"/v1/models/{mine}", headers=keys["b"]["headers"]), 404, "not_found")
    listed = client.get("/v1/models", headers=keys["b"]["headers"]).json()
    assert mine not in [m["id"] for m in listed["data"]]
    assert_problem(client.get("/v1/models/mdl_nope", headers=keys["a"]["headers"]), 404, "not_found")


def test_list_pagination(client, keys):
    h = keys["b"]["headers"]
    made = [upload(client, h, safetensors_bytes(seed=10 + i)).json()["id"] for i in range(5)]
    seen, after = [], None
    while True:
        page = client.get("/v1/models", headers=h, params={"limit": 2, **({"after": after} if after else {})}).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [m["id"] for m in page["data"]]
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert seen == list(reversed(made))  # newest first, each exactly once
    assert_problem(client.get("/v1/models", headers=h, params={"limit": 0}), 422, "validation_error")


def test_delete_model_conflicts_while_a_job_runs(client, keys, db, settings):
    h = keys["a"]["headers"]
    m = upload(client, h, safetensors_bytes(seed=42)).json()
    job = db.add_job(keys["a"]["id"], m["id"], status="running")
    body = assert_problem(client.delete(f"/v1/models/{m['id']}", headers=h), 409, "conflict")
    assert job in body["detail"]
    db.update(Job, job, status="succeeded")
    stored = settings.resolved_artifact_dir / "sha256" / m["sha256"][:2] / m["sha256"]
    assert stored.is_file()
    resp = client.delete(f"/v1/models/{m['id']}", headers=h)
    assert resp.status_code == 200 and resp.json()["deleted"] is True
    assert_problem(client.get(f"/v1/models/{m['id']}", headers=h), 404, "not_found")
    assert not stored.exists()  # no other artifact held those bytes
    assert db.get(Job, job).model_id == m["id"]  # the finished job keeps its reference


# --- the input contract, families and Hub registrations ---------------------------------------------

IMAGENET = {"input_mean": "0.485,0.456,0.406", "input_std": "0.229,0.224,0.225"}


def test_input_contract_is_stored_with_defaults_per_family(client, keys):
    h = keys["a"]["headers"]
    timm = upload(client, h, safetensors_bytes(seed=60), {"architecture": "timm:resnet18", "num_classes": "1000",
                                                          "dataset": "imagenet", "input_size": "3,224,224", **IMAGENET})
    assert timm.status_code == 201, timm.text
    m = timm.json()
    assert m["input_size"] == [3, 224, 224] and m["input_mean"] == [0.485, 0.456, 0.406]
    assert m["input_std"] == [0.229, 0.224, 0.225] and m["parent_model_id"] is None and m["source_job_id"] is None
    # omitted: a family model on a known data set gets that data set's statistics ...
    cifar = upload(client, h, safetensors_bytes(seed=61), {"architecture": "torchvision:resnet18", "num_classes": "10",
                                                           "dataset": "cifar10"}).json()
    assert cifar["input_mean"] == [0.4914, 0.4822, 0.4465] and cifar["input_size"] == [3, 32, 32]
    # ... a built-in one identity (it normalises inside), and so does an unknown data set
    builtin = upload(client, h, safetensors_bytes(seed=62), {**FIELDS}).json()
    assert builtin["input_mean"] == [0.0] and builtin["input_std"] == [1.0]
    other = upload(client, h, safetensors_bytes(seed=63), {"architecture": "timm:resnet18", "num_classes": "3",
                                                           "dataset": "mine", "input_size": "1,64,64"}).json()
    assert other["input_mean"] == [0.0] and other["input_std"] == [1.0]


@pytest.mark.parametrize("fields, field, words", [
    ({"input_mean": "0.5,0.5", "input_std": "0.2,0.2"}, "input_mean", "3 channels"),
    ({"input_mean": "0.5,0.5,0.5"}, "body", "both input_mean and input_std"),
    ({"input_mean": "0.5,0.5,0.5", "input_std": "0.2,0,0.2"}, "body", "> 0"),
    ({"input_mean": "a,b,c", "input_std": "1,1,1"}, "input_mean", "0.485"),
    ({"input_size": "3,224"}, "input_size", "three positive sizes"),
    ({"input_size": "3,224,224", "input_shape": "3,32,32"}, "body", "give one of them"),
])
def test_bad_input_contracts_are_422_and_store_nothing(client, keys, db, settings, fields, field, words):
    rows, files = db.count(Model), store_files(settings)
    resp = upload(client, keys["a"]["headers"], safetensors_bytes(seed=64),
                  {"architecture": "timm:resnet18", "num_classes": "3", "dataset": "cifar10", **fields})
    body = assert_problem(resp, 422, "validation_error")
    assert body["errors"][0]["field"] in (field, "") and words in body["detail"]
    assert db.count(Model) == rows and store_files(settings) == files


def test_family_names_are_checked_cheaply_and_hub_names_are_pointed_to_json(client, keys):
    h = keys["a"]["headers"]
    body = assert_problem(upload(client, h, safetensors_bytes(), {**FIELDS, "architecture": "resnet18"}),
                          422, "unsupported_architecture")
    assert "timm:resnet18 or torchvision:resnet18" in body["detail"] and "/v1/architectures" in body["detail"]
    body = assert_problem(upload(client, h, safetensors_bytes(), {**FIELDS, "architecture": "timm:hf-hub:acme/x"}),
                          422, "unsupported_architecture")
    assert '"source": "hf-hub"' in body["detail"]


def test_hub_registration_is_validated_by_the_worker(client, keys, queues):
    h = keys["a"]["headers"]
    before = queues.length(queues.cpu)
    resp = client.post("/v1/models", headers=h, json={"source": "hf-hub", "name": "acme/tiny-resnet",
                                                       "revision": "v1", "num_classes": 3, "dataset": "imagenet"})
    assert resp.status_code == 201, resp.text
    m = resp.json()
    assert m["source"] == "hf-hub" and m["status"] == "validating" and m["name"] == "acme/tiny-resnet"
    assert m["architecture"] == "timm:hf-hub:acme/tiny-resnet@v1"
    assert m["input_size"] is None and m["input_mean"] is None   # left to the hub's config.json
    assert queues.length(queues.cpu) == before + 1
    for bad in ({"name": "../etc"}, {"name": "a--b/c"}, {"num_classes": 1}, {"input_mean": [0.5], "input_std": [0]}):
        body = {"source": "hf-hub", "name": "acme/tiny-resnet", "num_classes": 3, "dataset": "imagenet", **bad}
        assert_problem(client.post("/v1/models", headers=h, json=body), 422, "validation_error")
    # every bad value of the input contract is a 422 naming its field (a JSON body states lists as lists)
    rgb = {"input_mean": [0.5, 0.5, 0.5], "input_std": [0.2, 0.2, 0.2]}
    for bad, field in (({"input_size": False}, "input_size"), ({"input_size": {}}, "input_size"),
                       ({"input_size": "3,224,224"}, "input_size"), ({"input_size": [3, 0, 8]}, "input_size"),
                       ({"input_mean": False, "input_std": [1.0]}, "input_mean"),
                       ({"input_mean": ["a"], "input_std": [1.0]}, "input_mean.0"),
                       ({"input_mean": [], "input_std": []}, "input_mean"),
                       ({"input_size": [1, 8, 8], **rgb}, ""),
                       ({"dataset": "digits", **rgb}, "input_mean"),   # digits images have one channel
                       ({"metadata": {"x": "y" * 70_000}}, "metadata")):
        body = {"source": "hf-hub", "name": "acme/tiny-resnet", "num_classes": 3, "dataset": "imagenet", **bad}
        problem = assert_problem(client.post("/v1/models", headers=h, json=body), 422, "validation_error")
        assert problem["errors"][0]["field"] == field, (bad, problem)
    assert queues.length(queues.cpu) == before + 1   # none of them was queued
