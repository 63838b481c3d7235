"""Hostile archives against a live API on PostgreSQL: each refused with its code, nothing stored,
listing still answers, and the API process's peak memory stays within a stated bound.

Before archives were bounded from their headers, one 1 MB zip holding a 1 GiB zero-filled ".png"
took the API up by +1.9 GB (+2.7 GB as a tar.gz), and a 9000×9000 PNG was decoded (+850 MB) before
the mixed-size refusal. Here the members are 256 MiB: read whole, each alone would break the bound.
"""
from __future__ import annotations

import io
import signal
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.archives import add_tar_entries, bad_archives, folder_entries, zip_bytes
from tests.e2e.conftest import kill_group, start_api

PEAK_BOUND_MIB = 120      # growth of the API process's peak RSS over the whole hostile set
ZEROS = 256 * 1024 * 1024
ARCHIVE_CAP = 1024 * 1024


def _peak_rss_mib(pid: int) -> float:
    """VmHWM: the most resident memory the process has ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def _zeros_zip(good: dict[str, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, content in good.items():
            archive.writestr(name, b"" if content is None else content)
        with archive.open("dog/zeros.png", "w", force_zip64=True) as fh:
            chunk = bytes(1024 * 1024)
            for _ in range(ZEROS // len(chunk)):
                fh.write(chunk)
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    """A stream of `n` zero bytes (so the test never holds the member itself)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _zeros_tar_gz(good: dict[str, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as archive:
        add_tar_entries(archive, good)
        info = tarfile.TarInfo("dog/zeros.png")
        info.size = ZEROS
        archive.addfile(info, io.BufferedReader(_Zeros(ZEROS)))
    return buf.getvalue()


def _huge_png_after_a_small_one(good: dict[str, bytes | None]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG", compress_level=9)
    return zip_bytes({**good, "emu/zzz-huge.png": buf.getvalue()})


@pytest.fixture(scope="module")
def api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    env = {**service_env, "ROBUSTIFY_MAX_ARCHIVE_BYTES": str(ARCHIVE_CAP),
           "ROBUSTIFY_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024)}
    proc, url = start_api(env, tmp_path_factory.mktemp("logs") / "api.log")
    try:
        yield proc, url
    finally:
        kill_group(proc, signal.SIGTERM)


def test_hostile_archives_are_refused_within_a_memory_bound(api, api_key: str) -> None:
    proc, url = api
    good = folder_entries(per_class=2, sizes=((16, 16),))
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        def upload(data: bytes, filename: str = "d.zip") -> httpx.Response:
            return client.post("/v1/datasets", files={"file": (filename, data, "application/octet-stream")})

        # warm up every code path an accepted archive takes, so the baseline holds Pillow and numpy
        assert upload(zip_bytes(good)).status_code == 201
        listed = client.get("/v1/datasets").json()["data"]
        baseline = _peak_rss_mib(proc.pid)

        hostile = {name: (code, data) for name, (code, data) in bad_archives(ARCHIVE_CAP).items()}
        hostile["256 MiB zeros in a zip"] = ("archive_too_large", _zeros_zip(good))
        hostile["256 MiB zeros in a tar.gz"] = ("archive_too_large", _zeros_tar_gz(good))
        hostile["9000x9000 PNG after 16x16 ones"] = ("archive_mixed_sizes", _huge_png_after_a_small_one(good))
        for name, (code, data) in hostile.items():
            r = upload(data, "d.tar.gz" if "tar" in name else "d.zip")
            assert r.status_code == 422 and r.json()["code"] == code, (name, r.status_code, r.text[:300])
            assert r.json()["detail"]                                   # a message a person can act on

        growth = _peak_rss_mib(proc.pid) - baseline
        assert growth < PEAK_BOUND_MIB, f"the API's peak RSS grew by {growth:.0f} MiB (bound {PEAK_BOUND_MIB})"
        after = client.get("/v1/datasets")
        assert after.status_code == 200 and after.json()["data"] == listed    # nothing stored, listing intact
        for ds in listed:
            assert client.get(f"/v1/datasets/{ds['id']}").status_code == 200
