"""One tenant cannot starve another: per-key shares of event streams and uploads (issue 18 point 5),
against a live uvicorn on PostgreSQL + Redis with two API keys (Alice = "a", Bob = "b").

Bob at his share gets 429 too_many_requests with Retry-After, while Alice's stream and upload still
work; the global stream limit still protects the process (503 service_busy); and every share comes
back however the request ended, a client that vanished mid-stream or mid-upload included."""
from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from api.app import create_app
from tests.service.conftest import LiveServer, make_settings
from tests.service.payloads import multipart_body, npz_bytes, safetensors_bytes
from tests.service.test_models_api import FIELDS, assert_problem

STREAMS_PER_KEY, UPLOADS_PER_KEY, ALL_STREAMS = 3, 2, 5
SSE = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pg_url: str, queues: Any) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("tenants"), pg_url, queues, max_streams_per_key=STREAMS_PER_KEY,
                             max_uploads_per_key=UPLOADS_PER_KEY, max_event_streams=ALL_STREAMS)
    with LiveServer(create_app(settings)) as live:
        yield live


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _held(server: LiveServer, kind: str, key_id: str) -> int:
    """The shares the server counts for a key (to wait for, never the thing asserted alone)."""
    return getattr(server.server.config.app.state.shares, kind).in_use(key_id)


def _open_stream(stack: ExitStack, http: httpx.Client, job: str, headers: dict[str, str]) -> httpx.Response:
    r = stack.enter_context(http.stream("GET", f"/v1/jobs/{job}/events", headers={**headers, **SSE}))
    if r.status_code == 200:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines).startswith("retry: ")  # the stream is live, not only its headers
        stack.callback(lines.close)  # keeps the reader (and so the stream) open until the stack closes
    else:
        r.read()
    return r


def _queued_job(db: Any, key_id: str) -> str:
    return db.add_job(key_id, db.add_model(key_id), status="queued")


def test_bob_at_his_stream_share_leaves_alice_hers(server: LiveServer, keys: dict[str, Any], db: Any) -> None:
    alice, bob = keys["a"], keys["b"]
    alice_job, bob_job = _queued_job(db, alice["id"]), _queued_job(db, bob["id"])
    with httpx.Client(base_url=server.url, timeout=15) as http:
        with ExitStack() as bobs:
            for _ in range(STREAMS_PER_KEY):
                assert _open_stream(bobs, http, bob_job, bob["headers"]).status_code == 200
            extra = _open_stream(bobs, http, bob_job, bob["headers"])
            body = assert_problem(extra, 429, "too_many_requests")
            assert extra.headers["retry-after"].isdigit() and "ROBUSTIFY_MAX_STREAMS_PER_KEY" in body["detail"]

            with ExitStack() as alices:
                # Alice's own share is whole although Bob is at his
                for _ in range(ALL_STREAMS - STREAMS_PER_KEY):
                    assert _open_stream(alices, http, alice_job, alice["headers"]).status_code == 200
                # ... and the process limit still holds: 5 streams open, the 6th is shed for everyone
                assert_problem(_open_stream(alices, http, alice_job, alice["headers"]), 503, "service_busy")
        # Bob closed his streams: his share is back, whole
        _wait(lambda: _held(server, "streams", bob["id"]) == 0, "Bob's streams to be given back")
        with ExitStack() as again:
            for _ in range(STREAMS_PER_KEY):
                assert _open_stream(again, http, bob_job, bob["headers"]).status_code == 200


def _raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the client vanished, it did not say goodbye."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_vanished_stream_client_gives_its_share_back(server: LiveServer, keys: dict[str, Any], db: Any) -> None:
    bob = keys["b"]
    job = _queued_job(db, bob["id"])
    port = int(server.url.rsplit(":", 1)[1])
    socks = []
    for _ in range(STREAMS_PER_KEY):
        sock = _raw_request(port, f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  f"Authorization: {bob['headers']['Authorization']}\r\n"
                                  "Accept: text/event-stream\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        socks.append(sock)
    _wait(lambda: _held(server, "streams", bob["id"]) == STREAMS_PER_KEY, "Bob's raw streams")
    with httpx.Client(base_url=server.url, timeout=15) as http:
        full = http.get(f"/v1/jobs/{job}/events", headers={**bob["headers"], **SSE})
        assert_problem(full, 429, "too_many_requests")
        for sock in socks:
            _reset(sock)
        _wait(lambda: _held(server, "streams", bob["id"]) == 0, "the vanished streams' shares")
        with ExitStack() as again:
            for _ in range(STREAMS_PER_KEY):
                assert _open_stream(again, http, job, bob["headers"]).status_code == 200


class _SlowUpload:
    """A chunked multipart upload that sends its first half, then waits until `finish` is set."""

    def __init__(self, url: str, path: str, headers: dict[str, str], fields: dict[str, str], data: bytes,
                 filename: str) -> None:
        body, content_type = multipart_body(fields, data, filename)
        self.finish = threading.Event()
        self.response: httpx.Response | None = None
        half = len(body) // 2

        def chunks() -> Iterator[bytes]:
            yield body[:half]
            self.finish.wait(30)
            yield body[half:]

        def send() -> None:
            self.response = httpx.post(f"{url}{path}", headers={**headers, "Content-Type": content_type},
                                       content=chunks(), timeout=40)

        self.thread = threading.Thread(target=send, daemon=True)
        self.thread.start()

    def complete(self) -> httpx.Response:
        self.finish.set()
        self.thread.join(timeout=30)
        assert self.response is not None
        return self.response


def _upload_model(http: httpx.Client, headers: dict[str, str], seed: int) -> httpx.Response:
    return http.post("/v1/models", headers=headers, data=FIELDS,
                     files={"file": ("m.safetensors", safetensors_bytes(seed), "application/octet-stream")})


def test_bob_at_his_upload_share_leaves_alice_hers(server: LiveServer, keys: dict[str, Any]) -> None:
    alice, bob = keys["a"], keys["b"]
    # Bob's two uploads in progress, one per route: both count against the same share
    slow = [_SlowUpload(server.url, "/v1/models", bob["headers"], FIELDS, safetensors_bytes(1), "m.safetensors"),
            _SlowUpload(server.url, "/v1/datasets", bob["headers"], {"name": "bob"}, npz_bytes(), "bob.npz")]
    _wait(lambda: _held(server, "uploads", bob["id"]) == UPLOADS_PER_KEY, "Bob's uploads to be in progress")
    with httpx.Client(base_url=server.url, timeout=15) as http:
        extra = _upload_model(http, bob["headers"], 2)
        body = assert_problem(extra, 429, "too_many_requests")
        assert extra.headers["retry-after"].isdigit() and "ROBUSTIFY_MAX_UPLOADS_PER_KEY" in body["detail"]
        ds = http.post("/v1/datasets", headers=alice["headers"], data={"name": "alice"},
                       files={"file": ("alice.npz", npz_bytes(), "application/octet-stream")})
        assert ds.status_code == 201, ds.text
        assert _upload_model(http, alice["headers"], 3).status_code == 201

        assert [u.complete().status_code for u in slow] == [201, 201]
        _wait(lambda: _held(server, "uploads", bob["id"]) == 0, "Bob's upload shares")
        assert _upload_model(http, bob["headers"], 4).status_code == 201  # his share is back


def test_a_vanished_upload_client_gives_its_share_back(server: LiveServer, keys: dict[str, Any]) -> None:
    bob = keys["b"]
    port = int(server.url.rsplit(":", 1)[1])
    body, content_type = multipart_body(FIELDS, safetensors_bytes(5))
    socks = [_raw_request(port, f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                f"Authorization: {bob['headers']['Authorization']}\r\nContent-Type: {content_type}\r\n"
                                f"Content-Length: {len(body)}\r\n", body[: len(body) // 2])
             for _ in range(UPLOADS_PER_KEY)]
    _wait(lambda: _held(server, "uploads", bob["id"]) == UPLOADS_PER_KEY, "Bob's half-sent uploads")
    for sock in socks:
        _reset(sock)
    _wait(lambda: _held(server, "uploads", bob["id"]) == 0, "the vanished uploads' shares")
    with httpx.Client(base_url=server.url, timeout=15) as http:
        assert _upload_model(http, bob["headers"], 6).status_code == 201
