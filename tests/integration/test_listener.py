"""The edge's limits on real loopback sockets: header and idle timeouts, the connection cap,
the cap on request heads (431), on the main listener and the admin one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from corral.server import CorralServer, build_server
from tests.helpers import free_port, make_settings, poll

pytestmark = pytest.mark.integration

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class EdgeServer:
    """``build_server(settings)`` (what ``corral serve`` runs) on a background uvloop."""

    def __init__(self, **server: Any) -> None:
        self.settings = make_settings([], server=server)
        self.port = self.settings.server.port
        self.admin_port = self.settings.server.admin_port
        self.server: CorralServer = build_server(self.settings)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        loop.run_until_complete(self.server.serve())
        loop.close()

    def __enter__(self) -> EdgeServer:
        self._thread.start()
        assert poll(lambda: self.server.started or not self._thread.is_alive(), 10, 0.01)
        assert self.server.started, "corral failed to start"
        if self.admin_port is not None:
            assert poll(lambda: _accepts(self.admin_port), 5, 0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(10)

    def sample(self, name: str, **labels: str) -> float:
        registry = self.server.corral.runtime.metrics.registry
        return float(registry.get_sample_value(name, labels) or 0.0)

    def open_connections(self) -> float:
        return self.sample("corral_open_connections")

    def refusals(self, reason: str) -> float:
        return self.sample("corral_edge_refusals_total", reason=reason)


@pytest.fixture
def edge() -> Iterator[Any]:
    started: list[EdgeServer] = []

    def start(**server: Any) -> EdgeServer:
        srv = EdgeServer(**server).__enter__()
        started.append(srv)
        return srv

    yield start
    for srv in reversed(started):
        srv.__exit__(None, None, None)


def _accepts(port: int | None) -> bool:
    assert port is not None
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def connect(port: int | None, timeout_s: float = 5) -> socket.socket:
    assert port is not None
    return socket.create_connection(("127.0.0.1", port), timeout=timeout_s)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer counts as close);
    a socket timeout means the server kept the connection open."""
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = _parse_head(head)
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, headers, body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """A whole answer read until close: status, headers, body."""
    assert raw, "closed without an answer"
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = _parse_head(head)
    return status, headers, body


def closed_within(sock: socket.socket, low_s: float, high_s: float) -> bytes:
    """What came before the server closed ``sock``, asserting the close took low_s..high_s."""
    started = time.monotonic()
    sock.settimeout(high_s + 2)
    try:
        got = read_until_closed(sock)
    except TimeoutError:
        pytest.fail(f"still open after {high_s + 2} s")
    took = time.monotonic() - started
    assert low_s <= took <= high_s, took
    return got


# Header read timeout ------------------------------------------------------------------------


def test_silent_connection_is_closed_after_header_timeout(edge: Any) -> None:
    """A connection that sends nothing is closed, without an answer, after header_timeout_s."""
    srv = edge(header_timeout_s=0.5)
    with connect(srv.port) as sock:
        assert closed_within(sock, 0.3, 3) == b""
    assert poll(lambda: srv.refusals("header_timeout") == 1, 2)


def test_half_a_header_gets_408_and_close(edge: Any) -> None:
    """A request head still incomplete after header_timeout_s gets 408 and the connection
    is closed, however slowly the client keeps trickling bytes."""
    srv = edge(header_timeout_s=0.5)
    with connect(srv.port) as sock:
        sock.sendall(HEALTHZ[:20])
        sock.sendall(HEALTHZ[20:])
        got = closed_within(sock, 0.3, 3)
    status, headers, body = answer(got)
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(body) == {"error": "request header timeout"}


def test_header_timeout_applies_to_each_request_on_a_kept_alive_connection(edge: Any) -> None:
    """After one answer on a kept-alive connection, a second head that stops halfway gets 408
    after header_timeout_s (the idle timeout is longer, so it is not what closes it)."""
    srv = edge(header_timeout_s=0.5, idle_timeout_s=30)
    with connect(srv.port) as sock:
        sock.sendall(HEALTHZ + b"\r\n")
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127")
        assert answer(closed_within(sock, 0.3, 3))[0] == 408


def test_idle_kept_alive_connection_is_closed_after_idle_timeout(edge: Any) -> None:
    """A kept-alive connection with no next request is closed after idle_timeout_s."""
    srv = edge(header_timeout_s=30, idle_timeout_s=0.5)
    with connect(srv.port) as sock:
        sock.sendall(HEALTHZ + b"\r\n")
        assert read_response(sock)[0] == 200
        assert closed_within(sock, 0.3, 3) == b""


# Connection cap -----------------------------------------------------------------------------


def _fill(port: int | None, n: int) -> list[socket.socket]:
    return [connect(port) for _ in range(n)]


def test_max_connections_refuses_with_503_and_recovers(edge: Any) -> None:
    """At max_connections a new connection gets 503 + Retry-After and is closed at once while
    an open one still works; it is counted; once idle ones time out, a new client is served."""
    srv = edge(max_connections=20, header_timeout_s=1.5, idle_timeout_s=1.5)
    socks = _fill(srv.port, 20)
    try:
        assert poll(lambda: srv.open_connections() == 20, 5)
        with connect(srv.port) as extra:
            status, headers, body = answer(closed_within(extra, 0, 1))
        assert status == 503
        assert headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert json.loads(body) == {"error": "too many connections"}
        assert srv.refusals("max_connections") == 1
        socks[0].sendall(HEALTHZ + b"\r\n")
        assert read_response(socks[0])[0] == 200
        # The idle ones time out and go; then a new client is served.
        assert poll(lambda: srv.open_connections() == 0, 10)
        r = httpx.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5)
        assert r.status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_connection_cap_counted_and_logged_once_with_descriptor_limit(tmp_path: Path) -> None:
    """``corral serve`` under a 104-descriptor limit caps client connections at
    (104 - 64) // 2 = 20 and says so at start; past it each refusal is counted in
    corral_edge_refusals_total and the episode is logged once, not per connection."""
    port = free_port()
    config = tmp_path / "corral.toml"
    config.write_text(
        f'[server]\nport = {port}\nlog_format = "json"\nheader_timeout_s = 30\n'
        "idle_timeout_s = 30\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    serve = 'ulimit -n 104 && exec "$0" -m corral serve --config "$1"'
    proc = subprocess.Popen(
        ["sh", "-c", serve, sys.executable, str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    socks: list[socket.socket] = []
    try:
        assert poll(lambda: _accepts(port), 20, 0.05)
        # The probe connection above may still be open for a moment: fill to the cap.
        socks.append(connect(port))
        socks[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        read_response(socks[0])
        socks += [connect(port) for _ in range(19)]
        refused = []
        for _ in range(5):
            with connect(port) as extra:
                refused.append(answer(read_until_closed(extra))[0])
        assert refused == [503] * 5
        socks[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _, _, body = read_response(socks[0])
        lines = body.decode().splitlines()
        assert 'corral_edge_refusals_total{reason="max_connections"} 5.0' in lines
        assert "corral_open_connections 20.0" in lines
    finally:
        for sock in socks:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    lowered = [e for e in events if e["event"] == "descriptor limit lowers max_connections"]
    assert len(lowered) == 1
    assert (lowered[0]["max_connections"], lowered[0]["effective"]) == (1024, 20)
    reached = [e for e in events if e["event"].startswith("connection cap reached")]
    assert len(reached) == 1
    assert reached[0]["max_connections"] == 20


# Request head caps --------------------------------------------------------------------------


def test_oversized_header_gets_431(edge: Any) -> None:
    """A head past max_header_bytes (one 70 KB header) gets 431 in JSON and a close."""
    srv = edge()
    with connect(srv.port) as sock:
        sock.sendall(HEALTHZ + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        status, headers, body = answer(read_until_closed(sock))
    assert status == 431
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "request header fields too large"}
    assert srv.refusals("headers_too_large") == 1


def test_too_many_headers_get_431(edge: Any) -> None:
    """A request with more than max_headers (100) headers gets 431 and a close."""
    srv = edge()
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(100))  # + Host: 101 headers
    with connect(srv.port) as sock:
        sock.sendall(HEALTHZ + extra + b"\r\n")
        status, _, body = answer(read_until_closed(sock))
    assert status == 431
    assert json.loads(body) == {"error": "request header fields too large"}
    assert srv.refusals("too_many_headers") == 1


def test_ninety_nine_reasonable_headers_are_served(edge: Any) -> None:
    """A request with 99 headers (httpx's own among them), most of 60-odd bytes, is served."""
    srv = edge()
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", timeout=5) as client:
        request = client.build_request("GET", "/healthz")
        mine = {f"x-header-{i}": "v" * 48 for i in range(99 - len(request.headers))}
        request.headers.update(mine)
        assert len(request.headers) == 99
        assert client.send(request).status_code == 200


def test_huge_header_is_refused_without_reading_it(edge: Any) -> None:
    """A 16 MB header sent at full speed is answered 431 and the connection closed once the
    first 64 KB are in: the server stops reading, so the client cannot write all of it."""
    srv = edge()
    total = 16 * 1024 * 1024
    sent = 0
    write_error: list[BaseException] = []
    sock = connect(srv.port, timeout_s=10)

    def write() -> None:
        nonlocal sent
        chunk = b"a" * 65536
        try:
            sock.sendall(HEALTHZ + b"X-Big: ")
            while sent < total:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError as exc:
            write_error.append(exc)

    writer = threading.Thread(target=write)
    started = time.monotonic()
    writer.start()
    try:
        got = read_until_closed(sock)
        took = time.monotonic() - started
        writer.join(10)
    finally:
        sock.close()
    assert answer(got)[0] == 431
    assert took < 2
    assert write_error, f"the server read all {sent} bytes"
    assert sent < total
    assert srv.refusals("headers_too_large") == 1


# The admin listener ---------------------------------------------------------------------------


def test_admin_listener_has_the_same_limits(edge: Any) -> None:
    """The admin listener times out silent connections, answers 431, and shares the
    connection cap with a few connections of its own: with the main port full it still
    serves, and past its headroom it answers 503."""
    srv = edge(admin_port=free_port(), header_timeout_s=1.5, max_connections=20)
    with connect(srv.admin_port) as sock:
        sock.sendall(HEALTHZ + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert answer(read_until_closed(sock))[0] == 431
    with connect(srv.admin_port) as sock:
        assert closed_within(sock, 1, 4) == b""
    main = _fill(srv.port, 20)
    admin = []
    try:
        assert poll(lambda: srv.open_connections() == 20, 5)
        with connect(srv.port) as extra:
            assert answer(read_until_closed(extra))[0] == 503
        admin = _fill(srv.admin_port, 8)
        admin[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(admin[0])[0] == 200
        with connect(srv.admin_port) as extra:
            assert answer(read_until_closed(extra))[0] == 503
    finally:
        for sock in main + admin:
            sock.close()
