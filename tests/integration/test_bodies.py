"""Request bodies from clients that stall or pile up: a pause limit between reads and a cap
on what corral holds at once, over real sockets."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from tests.helpers import poll

pytestmark = pytest.mark.integration


def start_upload(corral: Any, declared: int, sent: bytes, path: str = "/api/chat") -> socket.socket:
    """A client that declares ``declared`` body bytes, sends ``sent`` of them, and stops."""
    sock = socket.create_connection(("127.0.0.1", corral.port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{corral.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one whole response (the server closes the connection after it)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, body


def refusals(corral: Any, reason: str) -> float:
    value = corral.call(
        lambda: corral.runtime.metrics.registry.get_sample_value(
            "corral_edge_refusals_total", {"reason": reason}
        )
    )
    return value or 0.0


def test_a_stalled_upload_gets_408_and_is_let_go(sim_factory: Any, corral_factory: Any) -> None:
    """A client that stops sending its body mid-way: 408 once body_timeout_s passed, the
    connection closed, its bytes given back, counted."""
    sim = sim_factory(name="a")
    corral = corral_factory([{"id": "a", "url": sim.url}], server={"body_timeout_s": 0.3})
    started = time.monotonic()
    with start_upload(corral, 1000, b'{"model": "llama3.2", "messages": [') as sock:
        status, headers, body = answer(sock)
    assert status == 408
    assert 0.3 <= time.monotonic() - started < 5
    assert headers["connection"] == "close"
    assert json.loads(body)["error"].startswith("request body timeout")
    assert refusals(corral, "body_timeout") == 1
    assert corral.call(lambda: corral.runtime.bodies.held) == 0
    assert "/api/chat" not in sim.stats()["by_route"]


def test_bodies_held_at_once_are_capped(sim_factory: Any, corral_factory: Any) -> None:
    """Stalled uploads hold 80 KB of a 100 KB budget: a 30 KB request is refused with 503 +
    Retry-After (not queued, not buffered), a small one is served, and once the stalled
    ones are gone the big one is served too."""
    sim = sim_factory(name="a")
    corral = corral_factory(
        [{"id": "a", "url": sim.url}],
        server={"max_buffered_mb": 0.1, "max_body_mb": 1, "body_timeout_s": 30},
    )
    stalled = [start_upload(corral, 60_000, b" " * 40_000) for _ in range(2)]
    try:
        # until corral has read what the stalled clients sent
        assert poll(lambda: corral.call(lambda: corral.runtime.bodies.held) == 80_000, 5)
        chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        big = json.dumps({**chat, "pad": " " * 30_000, "stream": False})
        with corral.client() as client:
            refused = client.post("/api/chat", content=big)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "too many request bodies" in refused.json()["error"]
            small = client.post("/api/chat", json={**chat, "stream": False})
            assert small.status_code == 200
        assert refusals(corral, "buffered_bytes") == 1
    finally:
        for sock in stalled:
            sock.close()
    with corral.client() as client:
        # the stalled bodies are given back once their clients left
        assert poll(lambda: corral.call(lambda: corral.runtime.bodies.held) == 0, 5)
        assert client.post("/api/chat", content=big).status_code == 200


def test_a_stalled_blob_upload_gets_408(sim_factory: Any, corral_factory: Any) -> None:
    """Blob uploads stream to the backends instead of being held, but a client that stops
    sending one is let go all the same."""
    sim = sim_factory(name="a")
    corral = corral_factory([{"id": "a", "url": sim.url}], server={"body_timeout_s": 0.3})
    path = "/api/blobs/sha256:" + "ab" * 32
    with start_upload(corral, 1000, b"x" * 10, path) as sock:
        status, headers, body = answer(sock)
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(body)["error"].startswith("request body timeout")
    assert refusals(corral, "body_timeout") == 1
