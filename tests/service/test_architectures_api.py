"""GET /v1/architectures: the built-ins and families at once; a family's names from a background
subprocess (the API process never imports torch, no request waits for it: 503 catalog_building
meanwhile), cached in memory and on disk."""
from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from api.catalog import ArchitectureCatalog
from api.errors import ApiError
from tests.service.test_models_api import assert_problem


def _ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [a["id"] for a in resp.json()["data"]]


def _once_listed(get, timeout: float = 240):
    """The first answer that is not 503 catalog_building (each names a Retry-After)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = get()
        if resp.status_code != 503:
            return resp
        body = assert_problem(resp, 503, "catalog_building")
        assert 1 <= int(resp.headers["retry-after"]) <= 60, resp.headers
        assert time.monotonic() < deadline, body
        time.sleep(0.5)


def test_builtins_and_families_are_listed_without_a_name_list(client, keys, settings):
    resp = client.get("/v1/architectures", headers=keys["a"]["headers"])
    body = resp.json()
    assert _ids(resp) == ["small-cnn", "preact-resnet-18", "wide-resnet-28-10", "wide-resnet-34-10",
                          "timm:", "torchvision:", "robustbench:"]
    families = [a for a in body["data"] if a["object"] == "architecture_family"]
    assert next(f["search"] for f in families) == "/v1/architectures?family=timm&q="
    assert not (settings.data_dir / "cache").exists()   # no family was listed
    assert _ids(client.get("/v1/architectures", headers=keys["a"]["headers"],
                           params={"family": "builtin", "q": "RESNET"})) == [
        "preact-resnet-18", "wide-resnet-28-10", "wide-resnet-34-10"]
    assert_problem(client.get("/v1/architectures"), 401, "unauthorized")
    for bad in ("keras", ""):   # the schema's enum: no family is '' either
        assert_problem(client.get("/v1/architectures", headers=keys["a"]["headers"], params={"family": bad}),
                       422, "validation_error")
    family = client.get("/openapi.json").json()["paths"]["/v1/architectures"]["get"]["parameters"][0]
    assert family["name"] == "family" and family["schema"]["anyOf"][0]["enum"] == [
        "builtin", "timm", "torchvision", "robustbench"]


def test_timm_names_come_from_a_background_subprocess_and_are_searchable_and_paged(client, keys, settings):
    h = keys["a"]["headers"]
    first = client.get("/v1/architectures", headers=h, params={"family": "timm", "q": "resnet18", "limit": 100})
    body = assert_problem(first, 503, "catalog_building")   # answered at once: the listing runs meanwhile
    assert body["families"] == ["timm"] and "retry in" in body["detail"]
    assert not list((settings.data_dir / "cache").glob("architectures-timm-*.json"))
    names = _ids(_once_listed(lambda: client.get("/v1/architectures", headers=h,
                                                 params={"family": "timm", "q": "resnet18", "limit": 100})))
    assert "timm:resnet18" in names and all("resnet18" in n for n in names)
    cached = list((settings.data_dir / "cache").glob("architectures-timm-*.json"))
    # the same subprocess listed the other families: they answer at once
    assert "robustbench:Wang2023Better_WRN-28-10" in _ids(
        client.get("/v1/architectures", headers=h, params={"family": "robustbench", "q": "Wang2023"}))
    assert [p.name for p in cached] == [f"architectures-timm-{metadata.version('timm')}.json"]
    assert len(json.loads(cached[0].read_text())) > 1000   # every timm name, from timm.list_models()
    # paging with the last id as cursor gives every match exactly once; patterns with * work too
    seen, after = [], None
    while True:
        page = client.get("/v1/architectures", headers=h,
                          params={"family": "timm", "q": "resnet18*", "limit": 3,
                                  **({"after": after} if after else {})})
        body = page.json()
        seen += [a["id"] for a in body["data"]]
        after = body["last_id"]
        if not body["has_more"]:
            break
    assert seen == sorted(set(seen)) and "timm:resnet18" in seen and "timm:resnet18d" in seen
    assert all(s.startswith("timm:resnet18") for s in seen)
    assert_problem(client.get("/v1/architectures", headers=h, params={"family": "timm", "after": "timm:nope"}),
                   422, "validation_error")


def test_a_restarted_server_reads_the_names_back_from_disk(keys, settings):
    """A cache file for the installed version is used as it is: no subprocess runs."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    cache = settings.data_dir / "cache" / f"architectures-torchvision-{metadata.version('torchvision')}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([{"id": "torchvision:only-from-the-cache"}]))
    try:
        with TestClient(create_app(settings)) as fresh:
            assert _ids(fresh.get("/v1/architectures", headers=keys["a"]["headers"],
                                  params={"family": "torchvision"})) == ["torchvision:only-from-the-cache"]
    finally:
        cache.unlink()


def test_a_failed_listing_is_a_503_with_its_reason_and_not_rerun_by_every_request(tmp_path: Path):
    """A listing that fails (here: a command that exits with a message) is reported as it is, and
    not run again on every request; a catalog whose listing works answers after it is done."""
    broken = ArchitectureCatalog(tmp_path, command=[sys.executable, "-c", "import sys; sys.exit('timm is broken')"])
    try:
        for _ in range(50):
            try:
                broken.names(["timm"])
            except ApiError as exc:
                if exc.code == "catalog_unavailable":
                    assert "timm is broken" in exc.detail and int(exc.headers["Retry-After"]) > 1
                    break
                assert exc.code == "catalog_building" and exc.status == 503
            time.sleep(0.2)
        else:
            raise AssertionError("the failed listing was never reported")
        with pytest.raises(ApiError) as again:   # the next request is told the same, without a new listing
            broken.names(["timm"])
        assert again.value.code == "catalog_unavailable" and not broken._pending and not broken._building
        assert not list(tmp_path.iterdir())   # nothing cached
    finally:
        broken.close()
    listing = [sys.executable, "-c", "import json, sys; json.dump({f: [{'id': f + ':x'}] for f in sys.argv[1:]}, "
               "sys.stdout)"]
    works = ArchitectureCatalog(tmp_path, command=listing)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert works.names(["timm", "torchvision"]) == {"timm": [{"id": "timm:x"}],
                                                                "torchvision": [{"id": "torchvision:x"}]}
                break
            except ApiError as exc:
                assert exc.code == "catalog_building" and time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        works.close()
    # every family not known yet was listed by that one subprocess
    assert sorted(p.name.split("-")[1] for p in tmp_path.iterdir()) == ["robustbench", "timm", "torchvision"]
