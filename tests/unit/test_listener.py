"""The edge protocol in-process (a fake transport, the real parser): where a request head
ends, what counts against its cap, and the connection gate's arithmetic."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from corral.listener import ConnectionGate, EdgeLimits, EdgeProtocol, edge_protocol
from corral.metrics import Metrics


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 11434), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body; answers its length and the number of headers."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"bytes": size, "headers": len(scope["headers"])}).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Conn:
    """One connection to an EdgeProtocol listener with the default caps (64 KB, 100)."""

    def __init__(self, gate: ConnectionGate | None = None, **limits: Any) -> None:
        self.metrics = Metrics() if gate is None else gate.metrics
        self.gate = gate or ConnectionGate(10, self.metrics, nofile=4096)
        settings = {"header_timeout_s": 60, "max_header_bytes": 65536, "max_headers": 100}
        cls = edge_protocol(EdgeLimits(self.gate, **{**settings, **limits}))
        config = uvicorn.Config(echo, log_config=None, lifespan="off", proxy_headers=False)
        config.load()
        self.proto: EdgeProtocol = cls(config=config, server_state=ServerState(), app_state={})
        self.transport = FakeTransport()
        self.proto.connection_made(self.transport)

    async def send(self, *reads: bytes) -> list[tuple[int, dict[str, Any]]]:
        """Feed ``reads`` one at a time; the answers written (status, JSON body)."""
        for data in reads:
            self.proto.data_received(data)
            await asyncio.sleep(0)
        for _ in range(20):  # let the app tasks finish
            await asyncio.sleep(0)
        return answers(self.transport.written)

    def refusals(self, reason: str) -> float:
        sample = self.metrics.registry.get_sample_value(
            "corral_edge_refusals_total", {"reason": reason}
        )
        return sample or 0.0


def answers(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next(
            int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")
        )
        out.append((int(lines[0].split()[1]), json.loads(rest[:length])))
        raw = rest[length:]
    return out


def head(size: int) -> bytes:
    """A GET head of exactly ``size`` bytes (request line, Host, padding, empty line)."""
    start = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


async def test_head_of_exactly_the_cap_is_served_one_more_byte_is_431() -> None:
    """max_header_bytes counts the request line and all header lines: equal is fine."""
    conn = Conn()
    assert await conn.send(head(65536)) == [(200, {"bytes": 0, "headers": 2})]
    conn = Conn()
    assert await conn.send(head(65537)) == [(431, {"error": "request header fields too large"})]
    assert conn.transport.closed
    assert conn.refusals("headers_too_large") == 1


async def test_head_split_over_many_reads_counts_in_all() -> None:
    """A head trickled in 1 KB reads is capped in all, not per read."""
    data = head(65537)
    conn = Conn()
    got = await conn.send(*(data[i : i + 1024] for i in range(0, len(data), 1024)))
    assert got == [(431, {"error": "request header fields too large"})]


@pytest.mark.parametrize("reads", [1, 7])
async def test_body_bytes_do_not_count_against_the_head(reads: int) -> None:
    """A 1 MB body, in one read with its head or in several, is the app's to read."""
    body = b"x" * 1_000_000
    data = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + body
    step = len(data) // reads + 1
    conn = Conn()
    got = await conn.send(*(data[i : i + step] for i in range(0, len(data), step)))
    assert got == [(200, {"bytes": 1_000_000, "headers": 2})]


async def test_each_kept_alive_request_gets_its_own_head_budget() -> None:
    """Three requests with 40 KB heads on one connection (80 KB in all) are all served."""
    conn = Conn()
    for _ in range(3):
        conn.transport.written = b""
        assert (await conn.send(head(40_000)))[0][0] == 200


async def test_pipelined_requests_in_one_read_are_served() -> None:
    """Two requests in one read, the first's body past the head cap, are both answered."""
    first = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000
    conn = Conn()
    got = await conn.send(first + head(100))
    assert [status for status, _ in got] == [200, 200]


async def test_header_count_cap_stops_parsing_at_the_first_one_past() -> None:
    """max_headers counts Host too: 100 are served, the 101st is refused with 431."""
    conn = Conn()
    hundred = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(100)) + b"\r\n"
    assert await conn.send(hundred) == [(200, {"bytes": 0, "headers": 100})]
    conn = Conn()
    more = hundred[:-2] + b"H100: v\r\n\r\n"
    assert await conn.send(more) == [(431, {"error": "request header fields too large"})]
    assert conn.refusals("too_many_headers") == 1


async def test_expect_100_continue_still_answered() -> None:
    """The inlined header callback still sees Expect: 100-continue."""
    conn = Conn()
    conn.proto.data_received(
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert conn.transport.written == b"HTTP/1.1 100 Continue\r\n\r\n"


async def test_malformed_request_is_still_400() -> None:
    """A request the parser rejects is uvicorn's 400, not a 431."""
    conn = Conn()
    conn.proto.data_received(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert conn.transport.written.startswith(b"HTTP/1.1 400 ")
    assert conn.transport.closed


async def test_connection_past_the_cap_is_refused_unread() -> None:
    """Past max_connections: 503 with Retry-After at once, and what it sends is not parsed."""
    gate = ConnectionGate(1, Metrics(), nofile=4096)
    first = Conn(gate)
    refused = Conn(gate)
    written = refused.transport.written
    assert written.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1\r\n" in written
    assert refused.transport.closed
    refused.proto.data_received(head(100))
    assert refused.transport.written == written
    assert gate.open == 1
    refused.proto.connection_lost(None)
    assert gate.open == 1
    first.proto.connection_lost(None)
    assert gate.open == 0


@pytest.mark.parametrize(
    ("max_connections", "nofile", "headroom", "cap"),
    [
        (1024, 1024, 0, 480),  # (1024 - 64) // 2
        (1024, 1024, 8, 472),  # the admin listener's headroom comes out of the share
        (100, 1024, 8, 100),
        (1024, 65536, 0, 1024),
        (1024, 60, 0, 1),  # never below one
    ],
)
def test_gate_cap_leaves_descriptors_for_backends(
    max_connections: int, nofile: int, headroom: int, cap: int
) -> None:
    """The cap is max_connections or (soft limit - 64) // 2 - headroom, the lower."""
    gate = ConnectionGate(max_connections, Metrics(), headroom=headroom, nofile=nofile)
    assert gate.cap == cap


def test_gate_episode_logged_once_and_ends_below_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals are counted each; logged once per episode, which ends a tenth below the cap."""
    events: list[str] = []

    class Log:
        def warning(self, event: str, **kw: Any) -> None:
            events.append(event)

        def info(self, event: str, **kw: Any) -> None:
            events.append(event)

    import corral.listener

    monkeypatch.setattr(corral.listener, "log", Log())
    metrics = Metrics()
    gate = ConnectionGate(20, metrics, nofile=4096)
    assert all(gate.admit(0) for _ in range(20))
    assert not any(gate.admit(0) for _ in range(5))
    gate.release()  # 19 open: the episode goes on
    assert gate.admit(0)
    assert not gate.admit(0)
    assert events == ["connection cap reached: new connections get 503"]
    while gate.open >= 18:
        gate.release()
    assert events[-1] == "below the connection cap again"
    assert gate.admit(0)
    sample = metrics.registry.get_sample_value(
        "corral_edge_refusals_total", {"reason": "max_connections"}
    )
    assert sample == 6


def test_corral_raises_its_open_files_limit_towards_the_hard_limit() -> None:
    """A shell's soft limit of 1,024 would cap connections at a few hundred: corral serve
    raises it (in a child process here, so the test runner keeps its own)."""
    import subprocess
    import sys

    code = (
        "import resource;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096));"
        "from corral.server import raise_open_files;"
        "raise_open_files();"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "4096"
