"""Artifact store, API keys and the safetensors inspector, on their own."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

import migrations
from core.errors import InvalidModelFile
from core.service.apikeys import authenticate, create_api_key, hash_key, revoke_api_key
from core.service.db import ApiKey, Artifact
from core.service.sessions import make_engine, make_sessionmaker
from core.service.uploads import inspect_safetensors
from core.storage.artifacts import ArtifactStore, delete_artifact, record_artifact
from tests.service.payloads import pickle_bytes, safetensors_bytes, torch_zip_bytes


@pytest.fixture
def session(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrations.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        yield s
    engine.dispose()


def test_store_is_content_addressed_and_deletes_only_unshared_bytes(tmp_path, session):
    store = ArtifactStore(tmp_path / "art")
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    assert store.put_file(src) == (sha, 7, f"sha256/{sha[:2]}/{sha}")
    assert store.path(f"sha256/{sha[:2]}/{sha}").read_bytes() == b"weights"
    a = record_artifact(session, store, kind="checkpoint", content=b"weights", filename="a", content_type="x")
    b = record_artifact(session, store, kind="checkpoint", src_path=src, filename="b", content_type="x")
    assert a.sha256 == b.sha256 == sha and len(store.files()) == 1  # stored once
    delete_artifact(session, store, a)
    assert store.exists(ArtifactStore.relpath_for(sha))  # b still holds the bytes
    delete_artifact(session, store, b)
    assert not store.exists(ArtifactStore.relpath_for(sha)) and session.query(Artifact).count() == 0
    with pytest.raises(ValueError, match="outside the store"):
        store.path("../../etc/passwd")


def test_move_consumes_the_temp_file(tmp_path):
    store = ArtifactStore(tmp_path / "art")
    tmp = store.temp_file()
    tmp.write_bytes(b"upload")
    _, _, rel = store.put_file(tmp, move=True)
    assert not tmp.exists() and store.path(rel).read_bytes() == b"upload"
    assert [p.name for p in store.files()] == [hashlib.sha256(b"upload").hexdigest()]


def test_temp_files_of_stopped_processes_are_removed(tmp_path):
    """A process killed mid-upload leaves its temp file; the API at start and the workers' sweep
    remove those whose process is gone (and any very old one), never a live process's."""
    import os
    import subprocess
    import sys
    import time

    store = ArtifactStore(tmp_path / "art")
    mine = store.temp_file()
    code = f"from core.storage.artifacts import ArtifactStore; print(ArtifactStore({str(store.root)!r}).temp_file())"
    dead = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
                               ).stdout.strip())
    old = store.root / "tmp" / "upload-elsewhere-1-x"
    old.write_bytes(b"")
    os.utime(old, (time.time() - 3 * 24 * 3600,) * 2)
    assert dead.exists() and mine.exists()
    assert store.remove_stale_temp_files() == 2
    assert mine.exists() and not dead.exists() and not old.exists()


def test_a_failed_commit_takes_the_new_file_out_of_the_store(tmp_path, session):
    from sqlalchemy.exc import IntegrityError

    from core.storage.artifacts import commit_or_unstore

    store = ArtifactStore(tmp_path / "art")
    art = record_artifact(session, store, kind="dataset", content=b"new bytes", filename="d", content_type="x")
    session.add(ApiKey(id=art.id, name="x", prefix="rk_x", key_hash="h"))
    session.add(ApiKey(id=art.id + "2", name="y", prefix="rk_y", key_hash="h"))  # unique key_hash: the commit fails
    with pytest.raises(IntegrityError):
        commit_or_unstore(session, store, art.sha256)
    assert not store.exists(ArtifactStore.relpath_for(art.sha256)) and store.files() == []
    # bytes that a committed row already holds stay
    kept = record_artifact(session, store, kind="dataset", content=b"shared", filename="d", content_type="x")
    session.commit()
    again = record_artifact(session, store, kind="dataset", content=b"shared", filename="e", content_type="x")
    session.add(ApiKey(id="k1", name="x", prefix="rk_x", key_hash="h2"))
    session.add(ApiKey(id="k2", name="y", prefix="rk_y", key_hash="h2"))
    with pytest.raises(IntegrityError):
        commit_or_unstore(session, store, again.sha256)
    assert store.exists(ArtifactStore.relpath_for(kept.sha256))


def test_api_keys_are_stored_hashed_and_can_be_revoked(session):
    row, plain = create_api_key(session, "ci")
    session.commit()
    assert plain.startswith("rk_") and len(plain) > 40
    stored = session.get(ApiKey, row.id)
    assert stored.key_hash == hash_key(plain) and plain not in (stored.key_hash, stored.prefix, stored.name)
    assert authenticate(session, plain).id == row.id
    assert authenticate(session, plain + "x") is None and authenticate(session, "") is None
    assert authenticate(session, "sk_" + plain[3:]) is None
    assert revoke_api_key(session, row.id) is True
    session.commit()
    assert authenticate(session, plain) is None
    assert revoke_api_key(session, row.id) is False


def _write(tmp_path, data: bytes):
    p = tmp_path / "f.safetensors"
    p.write_bytes(data)
    return p


def test_inspect_reads_names_dtypes_and_shapes(tmp_path):
    p = _write(tmp_path, save_safetensors({"w": np.zeros((2, 3), np.float16), "n": np.zeros(0, np.int64)},
                                          metadata={"format": "np"}))
    assert inspect_safetensors(p) == {"w": {"dtype": "F16", "shape": [2, 3]}, "n": {"dtype": "I64", "shape": [0]}}


def _forge(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("data, words", [
    (pickle_bytes(), "arbitrary code"),
    (torch_zip_bytes(), "arbitrary code"),
    (safetensors_bytes()[:-1], "truncated"),
    (safetensors_bytes() + b"\0", "unexpected bytes"),
    (b"\x01\x02", "fewer than the 8-byte"),
    (struct.pack("<Q", 10**12) + b"{}", "not plausible"),
    (struct.pack("<Q", 5000) + b"{}", "truncated"),
    (_forge({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8"),
    (_forge({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (_forge({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
             "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3), "gap or overlap"),
    (_forge({"w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 4), "truncated"),
    (_forge([1, 2], b""), "not a JSON object"),
])
def test_inspect_refuses_bad_files(tmp_path, data, words):
    with pytest.raises(InvalidModelFile) as err:
        inspect_safetensors(_write(tmp_path, data))
    assert words in str(err.value) and err.value.code == "invalid_model_file"


def test_header_length_starting_with_0x80_is_not_mistaken_for_pickle(tmp_path):
    # A 0x180-long JSON header starts the file with 0x80 0x01, like a pickle; it must still parse.
    header = {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    raw = json.dumps(header).encode()
    raw += b" " * (0x180 - len(raw))
    p = _write(tmp_path, struct.pack("<Q", len(raw)) + raw + b"\x07")
    assert p.read_bytes()[:2] == b"\x80\x01"
    assert inspect_safetensors(p) == {"w": {"dtype": "U8", "shape": [1]}}


def test_an_answer_that_cannot_serialise_commits_nothing(tmp_path, session):
    """A row the API could not answer with (a class name holding a lone surrogate, as tarfile
    decodes raw bytes) is never committed, and its file leaves the store."""
    from pydantic import BaseModel
    from pydantic_core import PydanticSerializationError

    from core.service.db import Dataset
    from core.storage.artifacts import commit_or_unstore

    class Answer(BaseModel):
        class_names: list[str]

    store = ArtifactStore(tmp_path / "art")
    art = record_artifact(session, store, kind="dataset", content=b"npz bytes", filename="d.npz", content_type="x")
    ds = Dataset(id="ds_surrogate", name="d", status="ready", artifact_id=art.id, num_examples=2, num_classes=2,
                 image_shape=[1, 8, 8], class_names=["cat", "\udcff"], splits={"train": 1, "test": 1})
    session.add(ds)
    with pytest.raises(PydanticSerializationError):
        commit_or_unstore(session, store, art.sha256,
                          check=lambda: Answer(class_names=ds.class_names).model_dump_json())
    assert session.get(Dataset, "ds_surrogate") is None and store.files() == []
