"""corral.http1: the lean HTTP/1.1 client pool against real loopback servers."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.errors import UpstreamMalformedError
from corral.http1 import (
    BrokenResponseError,
    ConnectError,
    HeadersTimeoutError,
    Http1Pool,
    Http1Response,
    IdleTimeoutError,
    MalformedResponseError,
)
from tests.helpers import free_port

pytestmark = pytest.mark.integration

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """An ``asyncio.start_server`` on a free loopback port; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request off the stream: (head, decoded body), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        return head, b"".join(parts)
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def answer(body: bytes, *, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Test: Yes\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


def echo_server(server_requests: list[tuple[bytes, bytes]]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            server_requests.append(req)
            writer.write(answer(b"echo:" + req[1]))
            await writer.drain()

    return handle


async def read_body(resp: Http1Response) -> bytes:
    parts = []
    while data := await resp.read():
        parts.append(data)
    return b"".join(parts)


@pytest.fixture
async def pool() -> AsyncIterator[Http1Pool]:
    p = Http1Pool(connect_timeout_s=2.0)
    yield p
    await p.close()


async def test_content_length_body(pool: Http1Pool) -> None:
    """A Content-Length response arrives whole; the request carries Host and Content-Length only."""
    requests: list[tuple[bytes, bytes]] = []
    async with Server(echo_server(requests)) as srv:
        resp = await pool.open(
            "POST",
            srv.url + "/api/chat?x=1",
            [(b"Content-Type", b"application/json")],
            b'{"a":1}',
            headers_timeout_s=2,
            idle_timeout_s=2,
        )
        assert resp.status == 200
        assert resp.header(b"x-test") == b"Yes"
        assert (b"content-length", b"12") in resp.headers
        assert await read_body(resp) == b'echo:{"a":1}'
        assert resp.at_eof()
        resp.close()
    head, body = requests[0]
    assert head.startswith(b"POST /api/chat?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{srv.port}\r\n".encode() in head
    assert b"Content-Length: 7\r\n" in head
    assert b"user-agent" not in head.lower()
    assert b"accept-encoding" not in head.lower()
    assert body == b'{"a":1}'


async def test_chunked_body_split_across_many_writes(pool: Http1Pool) -> None:
    """A chunked response written a few bytes at a time is decoded in order."""
    events = [b"event %d\n" % i for i in range(40)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(wire), 7):
            writer.write(wire[i : i + 7])
            await writer.drain()
        await read_request(reader)  # hold the connection open

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2
        )
        assert await read_body(resp) == b"".join(events)
        assert resp.at_eof()
        assert pool.stats()["idle"] == 1  # complete and keep-alive: back in the pool
        resp.close()


async def test_keepalive_reuses_one_connection(pool: Http1Pool) -> None:
    """Sequential requests to one origin share one connection."""
    requests: list[tuple[bytes, bytes]] = []
    async with Server(echo_server(requests)) as srv:
        for i in range(5):
            resp = await pool.open(
                "POST", srv.url + "/x", [], b"%d" % i, headers_timeout_s=2, idle_timeout_s=2
            )
            assert await read_body(resp) == b"echo:%d" % i
            resp.close()
        assert srv.connections == 1
        assert pool.connects == 1


async def test_stale_reused_connection_is_retried(pool: Http1Pool) -> None:
    """A reused connection the server closes on the next request is replaced transparently."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while (req := await read_request(reader)) is not None:
            if served and srv.connections == 1:
                return  # the keep-alive connection dies as the second request arrives
            served += 1
            writer.write(answer(b"ok:" + req[1]))
            await writer.drain()

    async with Server(handle) as srv:
        for body in (b"1", b"2"):
            resp = await pool.open(
                "POST", srv.url + "/", [], body, headers_timeout_s=2, idle_timeout_s=2
            )
            assert await read_body(resp) == b"ok:" + body
            resp.close()
        assert srv.connections == 2
        assert pool.connects == 2


async def test_connect_refused_is_connect_error(pool: Http1Pool) -> None:
    """Nothing listening: ConnectError (nothing was sent)."""
    with pytest.raises(ConnectError):
        await pool.open(
            "GET",
            f"http://127.0.0.1:{free_port()}/",
            [],
            None,
            headers_timeout_s=1,
            idle_timeout_s=1,
        )


async def test_connect_error_names_no_address(pool: Http1Pool) -> None:
    """A refused connect says so in words a client may read; the address is for logs only."""
    port = free_port()
    with pytest.raises(ConnectError) as caught:
        await pool.open(
            "GET", f"http://127.0.0.1:{port}/", [], None, headers_timeout_s=1, idle_timeout_s=1
        )
    assert str(caught.value) == "connection refused"
    assert caught.value.address == f"127.0.0.1:{port}"


async def test_headers_timeout(pool: Http1Pool) -> None:
    """No response headers within headers_timeout_s: HeadersTimeoutError, connection closed."""
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        assert await reader.read() == b""  # the client gives up and closes
        closed.set()

    async with Server(handle) as srv:
        with pytest.raises(HeadersTimeoutError):
            await pool.open("GET", srv.url + "/", [], None, headers_timeout_s=0.1, idle_timeout_s=5)
        await asyncio.wait_for(closed.wait(), 2)
        assert pool.stats()["idle"] == 0


async def test_idle_timeout_mid_body(pool: Http1Pool) -> None:
    """Body bytes stop coming: the read after the first part raises IdleTimeoutError."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await writer.drain()
        await reader.read()

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=0.1
        )
        assert await resp.read() == b"first"
        with pytest.raises(IdleTimeoutError):
            await resp.read()
        assert not resp.at_eof()
        resp.close()
        assert pool.stats() == {"open": 0, "idle": 0, "connects": 1}


async def test_reset_mid_body_is_broken_response(pool: Http1Pool) -> None:
    """The server resets the connection mid-body: BrokenResponseError after the bytes it sent."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2
        )
        assert await resp.read() == b"partial"
        with pytest.raises(BrokenResponseError):
            await resp.read()
        resp.close()


async def test_flow_control_bounds_the_buffer(pool: Http1Pool) -> None:
    """A slow reader of a 10 MB body: the pool never holds more than ~1 MB of unread body."""
    size = 10 * 1024 * 1024
    block = b"x" * (1024 * 1024)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await read_request(reader)

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=5
        )
        total = 0
        reads = 0
        while data := await resp.read():
            total += len(data)
            reads += 1
            if reads % 4 == 0:
                await asyncio.sleep(0.005)  # a slow consumer
        assert total == size
        assert 0 < resp._peak_buffered <= 1024 * 1024
        assert resp.at_eof()
        resp.close()
        assert pool.stats()["idle"] == 1  # resumed and reusable after the pause


async def test_cancelled_read_closes_the_connection(pool: Http1Pool) -> None:
    """Cancelling a read mid-body closes the socket; the next request gets a fresh one."""
    closed = asyncio.Event()
    requests: list[tuple[bytes, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if srv.connections > 1:
            await echo_server(requests)(reader, writer)
            return
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstart")
        await writer.drain()
        assert await reader.read() == b""
        closed.set()

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=None
        )
        assert await resp.read() == b"start"
        task = asyncio.ensure_future(resp.read())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 2)
        resp.close()
        assert pool.stats()["idle"] == 0
        again = await pool.open(
            "POST", srv.url + "/", [], b"z", headers_timeout_s=2, idle_timeout_s=2
        )
        assert await read_body(again) == b"echo:z"
        assert srv.connections == 2


async def test_cancelled_open_closes_the_connection(pool: Http1Pool) -> None:
    """Cancelling open() while it waits for headers closes the socket."""
    closed = asyncio.Event()
    got_request = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        got_request.set()
        assert await reader.read() == b""
        closed.set()

    async with Server(handle) as srv:
        task = asyncio.ensure_future(
            pool.open("GET", srv.url + "/", [], None, headers_timeout_s=None, idle_timeout_s=None)
        )
        await asyncio.wait_for(got_request.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 2)
        assert pool.stats()["open"] == 0


async def test_close_before_eof_never_reuses(pool: Http1Pool) -> None:
    """close() with body still unread closes the socket instead of pooling it."""
    requests: list[tuple[bytes, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if srv.connections > 1:
            await echo_server(requests)(reader, writer)
            return
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await reader.read()

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2
        )
        resp.close()
        resp.close()  # idempotent
        with pytest.raises(BrokenResponseError):
            await resp.read()
        again = await pool.open(
            "POST", srv.url + "/", [], b"q", headers_timeout_s=2, idle_timeout_s=2
        )
        assert await read_body(again) == b"echo:q"
        assert srv.connections == 2


async def test_chunked_request_body_from_async_iterator(pool: Http1Pool) -> None:
    """An async-iterable body goes out chunked and arrives whole."""
    requests: list[tuple[bytes, bytes]] = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(10):
            yield b"part%d;" % i
            await asyncio.sleep(0)
        yield b""  # empty parts are skipped, not the terminator

    async with Server(echo_server(requests)) as srv:
        resp = await pool.open(
            "POST", srv.url + "/up", [], body(), headers_timeout_s=2, idle_timeout_s=2
        )
        expected = b"".join(b"part%d;" % i for i in range(10))
        assert await read_body(resp) == b"echo:" + expected
        resp.close()
        head, got = requests[0]
        assert b"Transfer-Encoding: chunked\r\n" in head
        assert b"content-length" not in head.lower()
        assert got == expected
        # The connection stays usable after a chunked request.
        resp = await pool.open(
            "POST", srv.url + "/", [], b"k", headers_timeout_s=2, idle_timeout_s=2
        )
        assert await read_body(resp) == b"echo:k"
        assert srv.connections == 1


async def test_head_204_and_304_have_no_body(pool: Http1Pool) -> None:
    """HEAD (despite Content-Length), 204 and 304 end at their headers; one connection for all."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            if req[0].startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            elif b"/204" in req[0]:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")
            await writer.drain()

    async with Server(handle) as srv:
        for method, path, status in [
            ("HEAD", "/", 200),
            ("GET", "/204", 204),
            ("GET", "/304", 304),
            ("HEAD", "/", 200),
        ]:
            resp = await pool.open(
                method, srv.url + path, [], None, headers_timeout_s=2, idle_timeout_s=2
            )
            assert resp.status == status
            assert await resp.read() == b""
            assert resp.at_eof()
            resp.close()
        assert srv.connections == 1


async def test_body_until_close_is_not_reused(pool: Http1Pool) -> None:
    """No Content-Length, not chunked: the body runs to the connection's end; never reused."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        writer.write(b"close")

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2
        )
        assert await read_body(resp) == b"until close"
        assert resp.at_eof()
        resp.close()
        assert pool.stats()["idle"] == 0


async def test_informational_response_is_skipped(pool: Http1Pool) -> None:
    """A 103 Early Hints before the answer is skipped; its headers are not the response's."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + answer(b"final"))
        await read_request(reader)

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2
        )
        assert resp.status == 200
        assert resp.header(b"link") is None
        assert await read_body(resp) == b"final"
        resp.close()


async def test_malformed_response_is_broken(pool: Http1Pool) -> None:
    """Garbage instead of a status line: BrokenResponseError."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await reader.read()

    async with Server(handle) as srv:
        with pytest.raises(BrokenResponseError):
            await pool.open("GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2)


def answering(raw: bytes) -> Handler:
    """A server that answers every request with ``raw`` and waits for the client to leave."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await reader.read()

    return handle


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n", "status 999"),
        (b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", "status 99"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", "header line over 8 KiB"),
        (b"HTTP/1.1 101 Switching\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", "switched"),
    ],
    ids=["garbage", "bad-status", "status-999", "status-099", "9k-header", "upgrade"],
)
async def test_malformed_response_is_malformed_error(pool: Http1Pool, raw: bytes, why: str) -> None:
    """What is no HTTP/1.1 corral can relay fails before the first byte as a malformed answer
    (an UpstreamMalformedError, an UpstreamBrokenError too), and the connection is dropped."""
    async with Server(answering(raw)) as srv:
        with pytest.raises(MalformedResponseError, match=why) as caught:
            await pool.open("GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2)
    assert isinstance(caught.value, UpstreamMalformedError)
    assert caught.value.reason == "malformed_http"
    assert pool.pool_stats() == (0, 0)


async def test_endless_response_head_is_cut_at_its_cap(pool: Http1Pool) -> None:
    """A backend that sends one header line forever: the read stops at 64 KiB of head."""
    sent = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        while True:
            writer.write(b"a" * 16384)
            await writer.drain()
            sent[0] += 16384

    async with Server(handle) as srv:
        with pytest.raises(MalformedResponseError, match="head over 64 KiB"):
            await pool.open("GET", srv.url + "/", [], None, headers_timeout_s=5, idle_timeout_s=5)
    # What the socket buffers held beyond the cap, at most: nothing near unbounded.
    assert sent[0] < 16 * 1024 * 1024


async def test_read_all_limit_leaves_the_rest(pool: Http1Pool) -> None:
    """read_all(limit) returns at most limit bytes; the rest stays readable."""
    requests: list[tuple[bytes, bytes]] = []
    async with Server(echo_server(requests)) as srv:
        resp = await pool.open(
            "POST", srv.url + "/", [], b"0123456789", headers_timeout_s=2, idle_timeout_s=2
        )
        assert await resp.read_all(4) == b"echo"
        assert not resp.at_eof()
        assert await resp.read_all(100) == b":0123456789"
        assert resp.at_eof()
        resp.close()


async def test_only_http_urls(pool: Http1Pool) -> None:
    """Other schemes and malformed URLs are refused with ValueError before anything is sent."""
    for url in (
        "ftp://x/",
        "http:///nohost",
        "http://h:99999/",
        "http://h/a b",
        "http://u@h/",
    ):
        with pytest.raises(ValueError, match=r"."):
            await pool.open("GET", url, [], None, headers_timeout_s=1, idle_timeout_s=1)
    assert pool.connects == 0


async def test_expired_idle_connection_is_not_reused() -> None:
    """An idle connection older than keepalive_s is closed, not reused."""
    requests: list[tuple[bytes, bytes]] = []
    pool = Http1Pool(connect_timeout_s=2, keepalive_s=0)
    try:
        async with Server(echo_server(requests)) as srv:
            for body in (b"a", b"b"):
                resp = await pool.open(
                    "POST", srv.url + "/", [], body, headers_timeout_s=2, idle_timeout_s=2
                )
                assert await read_body(resp) == b"echo:" + body
                resp.close()
            assert srv.connections == 2
    finally:
        await pool.close()


async def test_stray_bytes_after_response_close_the_connection(pool: Http1Pool) -> None:
    """A second, unasked-for response after the first one: that connection is not reused."""
    requests: list[tuple[bytes, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if srv.connections > 1:
            await echo_server(requests)(reader, writer)
            return
        await read_request(reader)
        writer.write(answer(b"one") + answer(b"two"))
        await reader.read()

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2
        )
        assert await read_body(resp) == b"one"
        resp.close()
        again = await pool.open(
            "POST", srv.url + "/", [], b"3", headers_timeout_s=2, idle_timeout_s=2
        )
        assert await read_body(again) == b"echo:3"
        assert srv.connections == 2


async def test_pool_close_fails_responses_in_flight() -> None:
    """close() closes every connection: a response mid-body fails with BrokenResponseError."""
    pool = Http1Pool(connect_timeout_s=2)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await reader.read()

    async with Server(handle) as srv:
        resp = await pool.open(
            "GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2
        )
        assert await resp.read() == b"ab"
        await pool.close()
        with pytest.raises(BrokenResponseError):
            await resp.read()
        assert pool.stats()["open"] == 0
        with pytest.raises(ConnectError):
            await pool.open("GET", srv.url + "/", [], None, headers_timeout_s=2, idle_timeout_s=2)


async def test_header_injection_is_refused(pool: Http1Pool) -> None:
    """CR/LF in a header value is a ValueError; caller copies of Host/Content-Length are dropped."""
    requests: list[tuple[bytes, bytes]] = []
    async with Server(echo_server(requests)) as srv:
        with pytest.raises(ValueError, match="CR or LF"):
            await pool.open(
                "GET",
                srv.url + "/",
                [(b"x", b"a\r\nb: c")],
                None,
                headers_timeout_s=2,
                idle_timeout_s=2,
            )
        resp = await pool.open(
            "POST",
            srv.url + "/",
            [(b"Host", b"evil"), (b"content-length", b"99"), (b"X-A", b"1")],
            b"hi",
            headers_timeout_s=2,
            idle_timeout_s=2,
        )
        assert await read_body(resp) == b"echo:hi"
        head = requests[0][0]
        assert b"evil" not in head
        assert b"content-length: 99" not in head.lower()
        assert b"X-A: 1\r\n" in head


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and its key (skips without openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to serve TLS with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_backend_over_tls(pool: Http1Pool, certificate: tuple[Path, Path]) -> None:
    """An ``https://`` backend is reached over TLS, its certificate checked against the
    trusted CAs, and the connection is reused like a plain one."""
    cert, key = certificate
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    requests: list[tuple[bytes, bytes]] = []
    server = await asyncio.start_server(echo_server(requests), "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"https://localhost:{port}/api/echo"
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await pool.open("POST", url, [], b"x", headers_timeout_s=5, idle_timeout_s=5)
        pool._ssl = trusting  # as if the certificate's CA were installed on the system
        for body in (b"one", b"two"):
            resp = await pool.open("POST", url, [], body, headers_timeout_s=5, idle_timeout_s=5)
            assert (resp.status, await read_body(resp)) == (200, b"echo:" + body)
            resp.close()
        assert pool.connects == 1  # one connection for both (the refused handshake made none)
        assert requests[0][0].split(b"\r\n")[1] == f"Host: localhost:{port}".encode()
    finally:
        server.close()
        await server.wait_closed()
