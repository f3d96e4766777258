"""A backend that dies in the middle of a plain JSON body: the client sees the cut, no traceback."""

from __future__ import annotations

import json
import logging
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

_TAGS = json.dumps({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]})
_ROUTES = {
    "/api/version": json.dumps({"version": "0.33.0"}),
    "/api/tags": _TAGS,
    "/api/ps": json.dumps({"models": []}),
}


class _Handler(socketserver.StreamRequestHandler):
    """Answer health probes properly; cut /api/generate after ``body_bytes`` of 1000."""

    body_bytes = 10

    def handle(self) -> None:
        try:
            while True:
                request_line = self.rfile.readline()
                if not request_line:
                    return
                path = request_line.split(b" ", 2)[1].decode()
                length = 0
                while (line := self.rfile.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.rfile.read(length)
                if path in _ROUTES:
                    body = _ROUTES[path].encode()
                    self.wfile.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    continue
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n" + b'{"model":"'[: self.body_bytes]
                )
                return  # closing the connection mid-body
        except (ConnectionError, IndexError, ValueError):
            return


def _serve(body_bytes: int) -> Iterator[str]:
    handler = type("Handler", (_Handler,), {"body_bytes": body_bytes})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def cutting_backend() -> Iterator[str]:
    yield from _serve(10)


@pytest.fixture
def headers_only_backend() -> Iterator[str]:
    yield from _serve(0)


def test_cut_plain_body_aborts_quietly(
    cutting_backend: str, corral_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The client gets a truncated body (a protocol error), corral logs no traceback."""
    corral = corral_factory([{"id": "cut", "url": cutting_backend}])
    with caplog.at_level(logging.ERROR), corral.client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
        # corral itself is fine afterwards.
        assert client.get("/healthz").status_code == 200
    assert not [r for r in caplog.records if r.exc_info]


def test_death_after_headers_is_retried_elsewhere(
    headers_only_backend: str, sim_factory: Any, corral_factory: Any
) -> None:
    """Headers but no body byte, then the backend dies: the client never saw it; retried."""
    good = sim_factory(name="good")
    corral = corral_factory(
        [{"id": "cut", "url": headers_only_backend}, {"id": "good", "url": good.url}],
        balancer={"strategy": "round_robin", "model_affinity": False},
        health={"consecutive_errors": 1000},
    )
    with corral.client() as client:
        for _ in range(4):
            r = client.post(
                "/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
            )
            assert r.status_code == 200
            assert r.headers["x-corral-backend"] == "good"
