"""The S3 artifact store and the workers' sha256-keyed cache, against a real S3-compatible server
(moto's standalone server over HTTP; boto3 is not mocked)."""
from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
from boto3.s3.transfer import TransferConfig

from core.errors import ArtifactCorrupt, ArtifactMissing, StorageUnavailable
from core.service.db import Artifact
from core.service.sessions import make_engine, make_sessionmaker
from core.storage.artifacts import ArtifactStore, delete_artifact, record_artifact
from core.storage.blobcache import BlobCache
from core.storage.files import relpath_for
from core.storage.s3 import S3ArtifactStore, make_s3_client

MiB = 1024 * 1024


def make_store(endpoint: str, bucket: str, tmp: Path, *, chunk: int = 5 * MiB, concurrency: int = 2,
               cache_bytes: int = 64 * MiB, presign: int = 0) -> S3ArtifactStore:
    return S3ArtifactStore(
        bucket, client=make_s3_client(endpoint, "us-east-1", "path"), prefix="team-a/",
        cache=BlobCache(tmp / "cache", cache_bytes), scratch_dir=tmp / "scratch",
        transfer=TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=concurrency),
        presign_seconds=presign)


def random_file(path: Path, size: int, seed: int = 0) -> str:
    rng = __import__("random").Random(seed)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(MiB, left)
            fh.write(rng.randbytes(n))
            left -= n
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_content_addressed_put_open_delete(s3_endpoint, s3_bucket, tmp_path):
    store = make_store(s3_endpoint, s3_bucket, tmp_path)
    raw = store.client
    tmp = store.temp_file(".safetensors")
    tmp.write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    assert store.put_file(tmp, move=True) == (sha, 7, relpath_for(sha))
    assert not tmp.exists()  # the temp file was consumed
    assert store.put_bytes(b"weights") == (sha, 7, relpath_for(sha))  # the same bytes: the same object
    assert store.keys() == [relpath_for(sha)]
    head = raw.head_object(Bucket=s3_bucket, Key=f"team-a/sha256/{sha[:2]}/{sha}")
    assert head["ContentLength"] == 7 and head["Metadata"] == {"sha256": sha}
    assert store.exists(relpath_for(sha)) and store.open(relpath_for(sha)).read() == b"weights"
    assert store.on_disk(relpath_for(sha)) is None  # nothing local: downloads go through open()/presign

    # rows: two rows share the object; it goes with the last of them
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    import migrations

    migrations.upgrade(str(engine.url))
    with make_sessionmaker(engine)() as s:
        a = record_artifact(s, store, kind="checkpoint", content=b"weights", filename="a", content_type="x")
        b = record_artifact(s, store, kind="checkpoint", content=b"weights", filename="b", content_type="x")
        s.commit()
        local = store.local_path(relpath_for(sha))
        assert local.read_bytes() == b"weights"
        delete_artifact(s, store, a)
        assert store.exists(relpath_for(sha))
        delete_artifact(s, store, b)
        assert not store.exists(relpath_for(sha)) and s.query(Artifact).count() == 0
    assert not local.exists(), "deleting the object also drops this process's cached copy"
    engine.dispose()

    with pytest.raises(ArtifactMissing) as missing:
        store.open(relpath_for(sha))
    assert s3_bucket in missing.value.message and "Upload the file again" in missing.value.message
    with pytest.raises(ArtifactMissing):
        store.local_path(relpath_for(sha))
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "a failed fetch leaves no file"
    with pytest.raises(ValueError, match="not a content-addressed artifact path"):
        store.open("sha256/../../other-team/x")


def test_large_file_goes_up_in_parts_streamed_from_disk(s3_endpoint, s3_bucket, tmp_path):
    store = make_store(s3_endpoint, s3_bucket, tmp_path, chunk=5 * MiB, concurrency=2)
    src = tmp_path / "big.safetensors"
    sha = random_file(src, 24 * MiB)
    tracemalloc.start()
    try:
        got_sha, size, rel = store.put_file(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (got_sha, size) == (sha, 24 * MiB) and src.exists()  # move=False keeps the source
    # never the whole file in memory (boto3 reads each part from disk as it sends it: ~4 MiB measured)
    assert peak < 12 * MiB, f"peak Python allocation {peak / MiB:.1f} MiB while uploading 24 MiB"
    # a multipart object's ETag is "<md5 of the part md5s>-<number of parts>"
    etag = store.client.head_object(Bucket=s3_bucket, Key=store.key(rel))["ETag"].strip('"')
    assert etag.endswith("-5"), etag
    local = store.local_path(rel)  # ranged GETs in parallel, then checked against the sha256
    assert local.stat().st_size == 24 * MiB and hashlib.sha256(local.read_bytes()).hexdigest() == sha
    assert local == store.local_path(rel)  # the second read is a cache hit


def test_a_damaged_object_is_never_used(s3_endpoint, s3_bucket, tmp_path):
    store = make_store(s3_endpoint, s3_bucket, tmp_path)
    _, _, rel = store.put_bytes(b"the real dataset")
    store.client.put_object(Bucket=s3_bucket, Key=store.key(rel), Body=b"bit rot")  # same name, other bytes
    with pytest.raises(ArtifactCorrupt) as exc:
        store.local_path(rel)
    assert "damaged" in exc.value.message
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "nothing of the bad copy is kept"


def test_unreachable_storage_is_a_clear_error(tmp_path):
    from tests.e2e.conftest import free_port

    store = S3ArtifactStore("nowhere", client=make_s3_client(f"http://127.0.0.1:{free_port()}", "us-east-1",
                                                             "path", attempts=1),
                            cache=BlobCache(tmp_path / "c", MiB), scratch_dir=tmp_path / "s")
    with pytest.raises(StorageUnavailable) as exc:
        store.put_bytes(b"x")
    assert "'nowhere'" in exc.value.message and "endpoint is reachable" in exc.value.message
    check = store.check()
    assert check["ok"] is False and check["backend"] == "s3" and check["error"]


def test_presigned_url_serves_the_bytes_for_a_while(s3_endpoint, s3_bucket, tmp_path):
    store = make_store(s3_endpoint, s3_bucket, tmp_path, presign=60)
    _, _, rel = store.put_bytes(b"best checkpoint")
    url = store.presigned_url(rel, filename="job 1 best.safetensors", content_type="application/octet-stream")
    assert url and "X-Amz-Expires=60" in url and "X-Amz-Signature=" in url
    r = httpx.get(url)  # no credentials: the signature is the authorisation (moto does not check it; S3 does)
    assert r.status_code == 200 and r.content == b"best checkpoint"
    assert r.headers["content-disposition"] == "attachment; filename*=utf-8''job%201%20best.safetensors"
    assert make_store(s3_endpoint, s3_bucket, tmp_path).presigned_url(rel, filename="a", content_type="x") is None


def test_cache_keeps_to_its_bound_least_recently_used_first(tmp_path):
    cache = BlobCache(tmp_path / "cache", max_bytes=250, grace_seconds=0)
    blobs = {name: bytes([i]) * 100 for i, name in enumerate("abcd")}
    shas = {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()}
    fetched: list[str] = []

    def fetcher(name: str):
        def fetch(dest: Path) -> None:
            fetched.append(name)
            dest.write_bytes(blobs[name])
        return fetch

    for i, name in enumerate("ab"):
        path = cache.get(shas[name], fetcher(name))
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))  # a used before b
    cache.get(shas["a"], fetcher("a"))  # a hit: now a is the most recent
    assert fetched == ["a", "b"]
    cache.get(shas["c"], fetcher("c"))  # 300 bytes > 250: b (least recently used) goes
    assert sorted(p.name for p in cache.entries()) == sorted([shas["a"], shas["c"]])
    assert cache.size() == 200
    # a copy in use (touched within the grace period) is kept even over the bound
    grace = BlobCache(tmp_path / "cache", max_bytes=250, grace_seconds=3600)
    grace.get(shas["d"], fetcher("d"))
    assert grace.size() == 300
    with pytest.raises(ArtifactCorrupt):
        cache.get(shas["b"], fetcher("a"))  # wrong bytes for the name: refused, nothing kept
    assert shas["b"] not in {p.name for p in cache.entries()}


def test_directory_store_has_the_same_interface(tmp_path):
    store = ArtifactStore(tmp_path / "art")
    _, _, rel = store.put_bytes(b"x")
    assert store.local_path(rel) == store.on_disk(rel) == store.path(rel)
    assert store.presigned_url(rel, filename="x", content_type="x") is None
    assert store.check() == {"ok": True, "backend": "directory"}
    store.delete(rel)
    with pytest.raises(ArtifactMissing):
        store.local_path(rel)
    with pytest.raises(ArtifactMissing):
        store.open(rel)
    assert store.on_disk(rel) is None


def _measurement_cache_round_trip(store, files) -> None:  # noqa: ANN001
    """worker/measurecache.py's StoreCache on `store`: an entry by key, replaced whole, a miss is
    None, an entry over the bound or a name that is no key is neither stored nor fatal.
    `files()` lists what the store holds."""
    from worker.measurecache import PREFIX, StoreCache

    key = hashlib.sha256(b"a measurement").hexdigest()
    cache = StoreCache(store, max_entry_bytes=100)
    assert cache.get(key) is None
    cache.put(key, b"first")
    cache.put(key, b"second")                  # the same key written again (another worker): replaced whole
    assert cache.get(key) == b"second" and store.get_named(PREFIX + key) == b"second"
    other = hashlib.sha256(b"too big").hexdigest()
    cache.put(other, b"x" * 101)               # over the bound: skipped
    assert cache.get(other) is None
    cache.put("../../escape", b"x")            # no key: refused by the store, logged, not raised
    assert cache.get("../../escape") is None
    assert files() == [PREFIX + key]


def test_measurement_cache_in_a_directory_store(tmp_path):
    store = ArtifactStore(tmp_path / "art")
    _measurement_cache_round_trip(store, lambda: sorted(str(p.relative_to(store.root)) for p in store.files()))


def test_measurement_cache_in_a_bucket(s3_endpoint, s3_bucket, tmp_path):
    store = make_store(s3_endpoint, s3_bucket, tmp_path)
    _measurement_cache_round_trip(store, store.keys)
    assert not any(store.cache.entries())      # named entries do not go through the sha256-keyed blob cache


# ------------------------------------------------------------------------------ through the API
def _s3_app(tmp_path: Path, pg_url: str, queues, endpoint: str, bucket: str, **over):  # noqa: ANN001, ANN202
    from api.app import create_app
    from tests.service.conftest import make_settings

    return create_app(make_settings(tmp_path, pg_url, queues, s3_bucket=bucket, s3_endpoint_url=endpoint,
                                    s3_addressing_style="path", s3_prefix="api/", s3_max_attempts=1, **over))


def _clients_follow_the_redirect(app, keys, db, tmp_path: Path) -> None:  # noqa: ANN001
    """`robustify jobs download` and the SDK through a presigned redirect: the bytes come from the
    bucket and are checked against the API's ETag (the sha256), not the bucket's own ETag."""
    from cli.main import main
    from robustify import Client
    from tests.service.conftest import LiveServer

    store = app.state.services.store
    job = db.add_job(keys["a"]["id"], db.add_model(keys["a"]["id"]), status="succeeded")
    with db.Session() as s:
        ck = record_artifact(s, store, kind="checkpoint", content=b"robust weights", filename="best.safetensors",
                             content_type="application/octet-stream", job_id=job, epoch=1, is_best=True)
        s.commit()
    with LiveServer(app) as live:
        assert main(["jobs", "download", job, "--out", str(tmp_path / "dl"), "--url", live.url,
                     "--key", keys["a"]["key"]]) == 0
        with Client(live.url, api_key=keys["a"]["key"]) as sdk:
            got = sdk.jobs.download(job, tmp_path / "sdk")
    assert (tmp_path / "dl" / "best.safetensors").read_bytes() == b"robust weights"
    assert got.checkpoint == tmp_path / "sdk" / "best.safetensors" and got.checkpoint.read_bytes() == b"robust weights"
    assert ck.sha256 == hashlib.sha256(b"robust weights").hexdigest()


def test_api_keeps_uploads_in_the_bucket_and_serves_them(pg_url, queues, keys, db, s3_endpoint, s3_bucket, tmp_path):
    from fastapi.testclient import TestClient

    from tests.service.payloads import safetensors_bytes
    from tests.service.test_models_api import FIELDS, assert_problem

    h = keys["a"]["headers"]
    data = safetensors_bytes()
    sha = hashlib.sha256(data).hexdigest()
    with TestClient(_s3_app(tmp_path / "streamed", pg_url, queues, s3_endpoint, s3_bucket)) as client:
        m = client.post("/v1/models", headers=h, data=FIELDS,
                        files={"file": ("my model.safetensors", data, "application/octet-stream")}).json()
        assert m["sha256"] == sha
        # the bytes are in the bucket under the prefix, and nothing stays on the API's disk
        s3 = make_s3_client(s3_endpoint, "us-east-1", "path")
        assert s3.get_object(Bucket=s3_bucket, Key=f"api/sha256/{sha[:2]}/{sha}")["Body"].read() == data
        assert not [p for p in tmp_path.rglob("*") if p.is_file()], "the API kept a local copy of the upload"
        ready = client.get("/readyz", headers=h).json()
        assert ready["checks"]["artifacts"] == {"ok": True, "backend": "s3", "bucket": s3_bucket}

        got = client.get(f"/v1/models/{m['id']}/content", headers=h)  # streamed through the API
        assert got.status_code == 200 and got.content == data and got.headers["etag"] == f'"{sha}"'
        assert got.headers["content-length"] == str(len(data))
        assert got.headers["content-disposition"] == "attachment; filename*=utf-8''my%20model.safetensors"
        assert client.get(f"/v1/models/{m['id']}/content", headers={**h, "If-None-Match": f'"{sha}"'}
                          ).status_code == 304

    with TestClient(_s3_app(tmp_path / "presigned", pg_url, queues, s3_endpoint, s3_bucket,
                            s3_presign_seconds=120)) as client:
        r = client.get(f"/v1/models/{m['id']}/content", headers=h, follow_redirects=False)
        assert r.status_code == 307 and r.headers["etag"] == f'"{sha}"'
        url = r.headers["location"]
        assert url.startswith(f"{s3_endpoint}/{s3_bucket}/api/sha256/") and "X-Amz-Expires=120" in url
        assert httpx.get(url).content == data
        _clients_follow_the_redirect(client.app, keys, db, tmp_path)
        s3.delete_object(Bucket=s3_bucket, Key=f"api/sha256/{sha[:2]}/{sha}")  # lost behind the API's back
        assert_problem(client.get(f"/v1/models/{m['id']}/content", headers=h), 410, "artifact_missing")

    # storage down: the upload is refused with a 503 that says what to check, and nothing is kept
    from tests.e2e.conftest import free_port

    dead = _s3_app(tmp_path / "down", pg_url, queues, f"http://127.0.0.1:{free_port()}", s3_bucket)
    with TestClient(dead) as client:
        before = client.get("/v1/models", headers=h).json()["data"]
        body = assert_problem(client.post("/v1/models", headers=h, data=FIELDS,
                                          files={"file": ("m.safetensors", data, "application/octet-stream")}),
                              503, "storage_unavailable")
        assert "endpoint is reachable" in body["detail"]
        assert client.get("/v1/models", headers=h).json()["data"] == before
        assert not [p for p in (tmp_path / "down").rglob("*") if p.is_file()]
        ready = client.get("/readyz", headers=h)
        assert ready.status_code == 503 and not ready.json()["checks"]["artifacts"]["ok"]
