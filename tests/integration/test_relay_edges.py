"""A stream that breaks in awkward places, through a real corral and a raw loopback backend:
the client always gets a finished stream whose last line is corral's error line."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.integration

PROBES = {
    "/api/version": {"version": "0.33.0"},
    "/api/tags": {"models": [{"name": "m:latest", "model": "m:latest", "size": 1000}]},
    "/api/ps": {"models": []},
}


class RawBackend(socketserver.ThreadingTCPServer):
    """Answers health probes like an Ollama; ``/api/chat`` with ``chat`` (raw bytes), then
    closes the connection."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, chat: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.chat = chat

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: RawBackend = self.server  # type: ignore[assignment]
        while True:
            line = self.rfile.readline()
            if not line:
                return
            path = line.split()[1].decode()
            length = 0
            while (header := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.rfile.read(length)
            if path in PROBES:
                body = json.dumps(PROBES[path]).encode()
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                continue
            self.wfile.write(server.chat)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return


@pytest.fixture
def backend_with(corral_factory: Any) -> Iterator[Any]:
    started: list[RawBackend] = []

    def start(chat: bytes) -> Any:
        raw = RawBackend(chat)
        threading.Thread(target=raw.serve_forever, daemon=True).start()
        started.append(raw)
        return corral_factory([{"id": "raw", "url": raw.url}], balancer={"max_attempts": 1})

    yield start
    for raw in started:
        raw.shutdown()
        raw.server_close()


def chat_lines(corral: Any) -> list[Any]:
    with corral.client() as client:
        r = client.post("/api/chat", json={"model": "m", "messages": []})
        assert r.status_code == 200
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def test_a_backends_content_length_does_not_bound_the_error_line(backend_with: Any) -> None:
    """The backend declared 1,000 bytes of NDJSON and died after one line: the client still
    gets that line and corral's error line after it (the length is not relayed)."""
    line = b'{"message":{"content":"a"},"done":false}\n'
    corral = backend_with(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: 1000\r\n\r\n"
        + line
    )
    lines = chat_lines(corral)
    assert lines[0] == json.loads(line)
    assert "error" in lines[-1]


def test_the_error_line_is_not_glued_to_a_long_unfinished_line(backend_with: Any) -> None:
    """A line longer than corral holds back (100 KB) went out unfinished when the backend
    died: the error line starts on a line of its own."""
    long = b'{"message":{"content":"' + b"a" * 100_000
    corral = backend_with(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(long), long)
    )
    with corral.client() as client:
        r = client.post("/api/chat", json={"model": "m", "messages": []})
    *first, last = r.text.splitlines()
    assert first == [long.decode()]
    assert json.loads(last)["error"].startswith("backend raw failed mid-stream")
