"""/openapi.json types every answer: each 2xx JSON response of every operation refers to a named
schema (Job, Model, JobList, ...), whose properties are typed in turn; downloads are binary."""
from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.service.settings import Settings


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # the embedded default (SQLite): the schema needs no database server
    settings = Settings(data_dir=tmp_path_factory.mktemp("openapi"))
    with TestClient(create_app(settings)) as client:
        return client.get("/openapi.json").json()


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def _untyped(spec: dict[str, Any], schema: dict[str, Any], where: str, seen: set[str]) -> list[str]:
    """Places under `schema` with no type at all (not a type, a $ref, an enum, a const or a union)."""
    ref = schema.get("$ref")
    if ref:
        if ref in seen:
            return []
        seen.add(ref)
        return _untyped(spec, _resolve(spec, schema), ref, seen)
    if not ({"type", "anyOf", "oneOf", "allOf", "enum", "const"} & set(schema)):
        return [where]
    found = []
    for name, sub in schema.get("properties", {}).items():
        found += _untyped(spec, sub, f"{where}.{name}", seen)
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            found += _untyped(spec, sub, f"{where}[{key}{i}]", seen)
    if isinstance(schema.get("items"), dict):
        found += _untyped(spec, schema["items"], f"{where}[]", seen)
    return found


def test_every_success_response_has_a_named_typed_schema(spec: dict[str, Any]) -> None:
    checked, problems = 0, []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            successes = {code: r for code, r in op["responses"].items() if code.startswith("2")}
            assert successes, f"{method.upper()} {path} documents no success response"
            for code, response in successes.items():
                for media, content in response.get("content", {}).items():
                    where = f"{method.upper()} {path} {code} {media}"
                    schema = content.get("schema") or {}
                    if media == "application/json":
                        if "$ref" not in schema:
                            problems.append(f"{where}: not a named schema: {schema}")
                            continue
                        target = _resolve(spec, schema)
                        if target.get("type") != "object" or not target.get("properties"):
                            problems.append(f"{where}: {schema['$ref']} is an untyped object")
                        problems += [f"{where}: untyped {p}" for p in _untyped(spec, schema, schema["$ref"], set())]
                    elif not schema.get("type"):
                        problems.append(f"{where}: no schema")
                    checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 25


def test_the_main_objects_state_their_fields(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    job = schemas["Job"]
    assert job["additionalProperties"] is False
    assert set(job["required"]) >= {"id", "status", "progress", "latest_metrics", "urls"}
    assert job["properties"]["status"]["enum"] == ["queued", "running", "cancelling", "succeeded", "failed",
                                                   "cancelled"]
    assert schemas["JobList"]["properties"]["data"]["items"] == {"$ref": "#/components/schemas/Job"}
    assert schemas["EventList"]["properties"]["last_id"]["anyOf"][0]["type"] == "integer"
    assert schemas["Model"]["properties"]["urls"] == {"$ref": "#/components/schemas/ModelUrls"}
    assert "self" in schemas["ModelUrls"]["properties"]
    ops = spec["paths"]
    assert ops["/v1/jobs"]["post"]["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Job"}
    assert set(ops["/v1/jobs/{job_id}/checkpoint"]["get"]["responses"]["200"]["content"]) == {
        "application/octet-stream"}
    assert "text/event-stream" in ops["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
