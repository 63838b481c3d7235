"""What every client relies on regardless of the route: a body that does not parse is a 400
`bad_request` saying where, and /openapi.json documents the recipe configs with their defaults.
The embedded default (SQLite, auth off, server-less broker): nothing here is queued."""
from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

import migrations
from api.app import create_app
from core.engine.config import EvaluateConfig, FinetuneConfig
from core.service.settings import Settings
from tests.service.test_models_api import assert_problem

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # auth off as on the embedded default served on localhost (an in-process client binds no socket)
    settings = Settings(data_dir=tmp_path_factory.mktemp("contract"), auth="off")
    migrations.upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/models"])
def test_malformed_json_is_a_bad_request_with_the_position(client, path):
    body = assert_problem(client.post(path, content=b'{"type": "finetune",\n "dataset": }', headers=JSON),
                          400, "bad_request")
    assert body["detail"].startswith("the body is not valid JSON: Expecting value: line 2 column 13 (char 33)")
    assert (body["position"], body["line"], body["column"]) == (33, 2, 13)
    assert "errors" not in body


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/models"])
def test_a_body_that_is_not_text_is_a_bad_request(client, path):
    body = assert_problem(client.post(path, content=b'{"a": "\xff\xff"}', headers=JSON), 400, "bad_request")
    assert body["detail"].startswith("the body is not valid JSON") and "UTF-8" in body["detail"]


def test_a_bad_recipe_value_is_still_a_422_naming_the_field(client):
    r = client.post("/v1/jobs", json={"type": "evaluate", "model_id": "mdl_x", "dataset": "digits",
                                      "config": {"wpgd_steps": 0}})
    body = assert_problem(r, 422, "validation_error")
    assert [e["field"] for e in body["errors"]] == ["config.wpgd_steps"]
    r = client.post("/v1/jobs", json={"type": "finetune", "model_id": "mdl_x", "dataset": "digits",
                                      "config": {"wpgd_steps": 10}})  # an evaluation field on a fine-tune
    assert [e["field"] for e in assert_problem(r, 422, "validation_error")["errors"]] == ["config.wpgd_steps"]


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_openapi_documents_both_recipe_configs_with_defaults(client):
    spec = client.get("/openapi.json").json()
    config = spec["components"]["schemas"]["JobCreate"]["properties"]["config"]
    recipes = {s["title"]: s for s in (_resolve(spec, alt) for alt in config["anyOf"])}
    assert set(recipes) == {"FinetuneConfig", "EvaluateConfig"}
    for model in (FinetuneConfig, EvaluateConfig):
        props = recipes[model.__name__]["properties"]
        assert set(props) == set(model.model_fields)
        for name, field in model.model_fields.items():
            if field.default is not None and not callable(field.default_factory):
                assert props[name].get("default") == field.default, name
    assert recipes["FinetuneConfig"]["properties"]["attack_steps"]["default"] == 10
    assert recipes["EvaluateConfig"]["properties"]["wpgd_steps"]["default"] == 50
    # Every reference inside the recipes resolves (threat_model -> ThreatModelSpec).
    tm = recipes["FinetuneConfig"]["properties"]["threat_model"]
    refs = [tm.get("$ref")] + [a.get("$ref") for a in tm.get("anyOf", []) + tm.get("allOf", [])]
    assert any(r and _resolve(spec, {"$ref": r})["title"] == "ThreatModelSpec" for r in refs)
