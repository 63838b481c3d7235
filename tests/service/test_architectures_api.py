"""GET /v1/architectures: the built-ins and families at once; a family's names from a subprocess
(the API process never imports torch), cached in memory and on disk."""
from __future__ import annotations

import json
from importlib import metadata

from tests.service.test_models_api import assert_problem


def _ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [a["id"] for a in resp.json()["data"]]


def test_builtins_and_families_are_listed_without_a_name_list(client, keys, settings):
    resp = client.get("/v1/architectures", headers=keys["a"]["headers"])
    body = resp.json()
    assert _ids(resp) == ["small-cnn", "preact-resnet-18", "wide-resnet-28-10", "wide-resnet-34-10",
                          "timm:", "torchvision:", "robustbench:"]
    families = [a for a in body["data"] if a["object"] == "architecture_family"]
    assert [f["search"] for f in families][0] == "/v1/architectures?family=timm&q="
    assert not (settings.data_dir / "cache").exists()   # no family was listed
    assert _ids(client.get("/v1/architectures", headers=keys["a"]["headers"],
                           params={"family": "builtin", "q": "RESNET"})) == [
        "preact-resnet-18", "wide-resnet-28-10", "wide-resnet-34-10"]
    assert_problem(client.get("/v1/architectures"), 401, "unauthorized")
    assert_problem(client.get("/v1/architectures", headers=keys["a"]["headers"], params={"family": "keras"}),
                   422, "validation_error")


def test_timm_names_come_from_a_subprocess_and_are_searchable_and_paged(client, keys, settings):
    h = keys["a"]["headers"]
    names = _ids(client.get("/v1/architectures", headers=h, params={"family": "timm", "q": "resnet18", "limit": 100}))
    assert "timm:resnet18" in names and all("resnet18" in n for n in names)
    cached = list((settings.data_dir / "cache").glob("architectures-timm-*.json"))
    assert [p.name for p in cached] == [f"architectures-timm-{metadata.version('timm')}.json"]
    assert len(json.loads(cached[0].read_text())) > 1000   # every timm name, from timm.list_models()
    # paging with the last id as cursor gives every match exactly once; patterns with * work too
    seen, after = [], None
    while True:
        page = client.get("/v1/architectures", headers=h,
                          params={"family": "timm", "q": "resnet18*", "limit": 3, **({"after": after} if after else {})})
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
