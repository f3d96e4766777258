"""A lean HTTP/1.1 client connection pool: asyncio Protocols and llhttp (``httptools``).

corral sends every proxied request to a backend over HTTP/1.1. aiohttp's client costs tens of
microseconds of CPU per request (request and response objects, multidict headers, timers, a
cookie jar); this does the little corral needs with futures and callbacks only:

- ``http://`` and ``https://`` (TLS verified against the system's CAs);
- one connection pool, keyed by ``(host, port, tls)``, with a LIFO idle list per key: the most
  recently used connection is reused first, and idle ones older than ``keepalive_s`` or closed
  by the server are dropped before use (and by a lazy timer while the pool is quiet);
- one ``transport.write`` per request when the body is ``bytes`` (request line, headers and
  body joined); chunked transfer-encoding for async-iterable bodies;
- responses parsed by ``httptools.HttpResponseParser`` straight into the response's buffer;
  ``read()`` hands out whatever arrived, decoded from chunked;
- flow control: past ``_HIGH_WATER`` bytes of unread body the socket stops being read until
  the reader drains the buffer, so a slow reader does not make memory grow;
- a connection goes back to the pool only once its response was received completely and it
  is reusable (keep-alive); a cancelled or closed-early response closes its socket;
- errors are corral's (``corral.errors``): ConnectError is an UpstreamConnectError, the two
  timeouts UpstreamTimeoutErrors, BrokenResponseError an UpstreamBrokenError, and
  MalformedResponseError (not HTTP, a status outside 100-599, a header line over 8 KiB, a
  response head over 64 KiB) also an UpstreamMalformedError. Their messages name no host or
  port (clients may read them); the address is the error's ``address``, for logs;
- a response head is read into at most ``_MAX_HEAD_BYTES``: a backend that sends headers
  forever costs a bounded amount of memory;
- a request that fails on a reused connection before any response byte arrived (the server
  closed the idle connection at the same moment) is sent again once on a fresh connection,
  when its body can be replayed (``bytes`` or ``None``), as aiohttp and urllib3 do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import AsyncIterable
from typing import Any, cast

import httptools

from corral.errors import (
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamMalformedError,
    UpstreamTimeoutError,
)

__all__ = [
    "BrokenResponseError",
    "ConnectError",
    "HeadersTimeoutError",
    "Http1Pool",
    "Http1Response",
    "IdleTimeoutError",
    "MalformedResponseError",
    "connect_failure",
]

# Unread body bytes past which the socket stops being read (until the reader drains them).
_HIGH_WATER = 256 * 1024
# A response head (status line and headers) corral reads at most; one header line at most.
# Ollama sends a few hundred bytes; nginx refuses an upstream head over 4-8 KiB.
_MAX_HEAD_BYTES = 64 * 1024
_MAX_HEADER_LINE = 8 * 1024
_URL_CACHE_MAX = 1024
# Request headers the pool writes itself: a caller's copy is dropped.
_OWN_HEADERS = frozenset((b"host", b"content-length", b"transfer-encoding"))
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_BAD_TARGET = (" ", "\r", "\n", "\t", "\x00")

Key = tuple[str, int, bool]  # host, port, TLS
_PARSE_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class ConnectError(UpstreamConnectError):
    """Could not connect (refused, unreachable, timed out): nothing was sent, safe to retry."""


class HeadersTimeoutError(UpstreamTimeoutError):
    """The request was sent but no response headers came within ``headers_timeout_s``."""


class IdleTimeoutError(UpstreamTimeoutError):
    """No body bytes came within ``idle_timeout_s``."""


class BrokenResponseError(UpstreamBrokenError):
    """The connection closed or reset, or the response was malformed, before it completed."""


class MalformedResponseError(BrokenResponseError, UpstreamMalformedError):
    """The response is not HTTP/1.1 corral accepts: a parse error, a status outside 100-599,
    a header line over 8 KiB, a head over 64 KiB, a protocol switch."""


class _Malformed(Exception):
    """Raised from a parser callback: the response is malformed (the message says how)."""


class _StaleConnectionError(Exception):
    """A reused connection died before any response byte: the request may be sent again."""


class _StopParsing(Exception):
    """Raised from a parser callback to stop ``feed_data`` (HEAD headers, stray bytes)."""


class Http1Response:
    """One response: status and headers at once, the body through ``read()``."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_complete",
        "_conn",
        "_error",
        "_head",
        "_headers_done",
        "_idle_timeout_s",
        "_keep",
        "_loop",
        "_peak_buffered",
        "_spoiled",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(
        self,
        conn: _Conn,
        loop: asyncio.AbstractEventLoop,
        head: bool,
        idle_timeout_s: float | None,
    ) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._conn: _Conn | None = conn
        self._loop = loop
        self._head = head
        self._idle_timeout_s = idle_timeout_s
        self._chunks: list[bytes] = []
        self._buffered = 0  # bytes in _chunks
        self._peak_buffered = 0  # the most bytes _chunks ever held (tests watch it)
        self._headers_done = False
        self._complete = False  # the whole body was received (maybe not yet read)
        self._keep = False  # the connection may carry another request
        self._spoiled = False  # the request is not (yet) fully sent: never reuse
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Http1Response {self.status} complete={self._complete} closed={self._closed}>"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def at_eof(self) -> bool:
        """The whole body was received and handed out by ``read()``."""
        return self._complete and not self._chunks

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" at the end."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                conn = self._conn
                if conn is not None and conn.read_paused:
                    conn.resume_reading()
                return data
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            if self._closed:
                raise BrokenResponseError("the response was closed before its end")
            await self._wait(self._idle_timeout_s, IdleTimeoutError)

    async def read_all(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the rest of the body (what is left over stays readable)."""
        parts: list[bytes] = []
        n = 0
        while n < limit:
            data = await self.read()
            if not data:
                break
            parts.append(data)
            n += len(data)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(out) > limit:
            self._chunks.insert(0, out[limit:])
            self._buffered += len(out) - limit
            out = out[:limit]
        return out

    def close(self) -> None:
        """Done with the response. A connection with body still to come is closed, not reused.

        (A response received completely already gave its connection back to the pool.)
        """
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self._buffered = 0
        self._drop()

    # -- internals --

    async def _wait(self, timeout_s: float | None, error: type[Exception]) -> None:
        """Wait for the connection to report progress; a cancelled wait closes the connection."""
        loop = self._loop
        waiter = loop.create_future()
        self._waiter = waiter
        timer = (
            None
            if timeout_s is None
            else loop.call_later(timeout_s, self._on_timeout, waiter, error, timeout_s)
        )
        try:
            await waiter
        except BaseException:
            # Cancelled: the connection's state is unknown from here on. Never reuse it.
            self._waiter = None
            self._fail(BrokenResponseError("the request was cancelled"))
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _on_timeout(
        self, waiter: asyncio.Future[None], error: type[Exception], timeout_s: float
    ) -> None:
        if self._waiter is waiter:
            what = "response headers" if error is HeadersTimeoutError else "body bytes"
            self._fail(error(f"no {what} within {timeout_s:g}s"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        """The response cannot complete: record why, close the connection, wake the reader."""
        if self._error is None and not self._complete:
            self._error = exc
        self._drop()

    def _drop(self) -> None:
        """Close the connection (never to be reused) and wake the reader."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.resp = None
            conn.close()
        self._wake()

    def _until_close(self) -> bool:
        """The body is delimited by the connection's end (no length, not chunked)."""
        if self._head or self.status in (204, 304) or self.status < 200:
            return False
        for name, value in self.headers:
            if name == b"content-length":
                return False
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                return False
        return True


class _Conn(asyncio.Protocol):
    """One connection: the transport, its parser (the callbacks below) and its response."""

    def __init__(self, pool: Http1Pool, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser: Any = httptools.HttpResponseParser(self)
        self.resp: Http1Response | None = None
        self.lost = False
        self.reused = False  # taken from the idle list (so it may have gone stale)
        self.head_bytes = 0  # bytes of the current response's head so far (0: none arrived)
        self.idle_since = 0.0
        self.read_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.head_stop = False  # a HEAD response's headers ended: feed_data was stopped
        self.head_keep = False

    def __repr__(self) -> str:
        return f"<_Conn {self.key[0]}:{self.key[1]} lost={self.lost} resp={self.resp!r}>"

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def resume_reading(self) -> None:
        self.read_paused = False
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self.write_paused and not self.lost:
            waiter = asyncio.get_running_loop().create_future()
            self.drain_waiter = waiter
            await waiter

    def _wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):  # not TCP / an odd transport
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        r = self.resp
        if r is None:
            # Bytes on an idle connection: no request asked for them. Do not trust it again.
            self.close()
            return
        if not r._headers_done:
            self._head_received(r, data)
            return
        try:
            self.parser.feed_data(data)
        except _PARSE_ERRORS as exc:
            self._parse_failed(r, data, exc)

    def _head_received(self, r: Http1Response, data: bytes) -> None:
        """Bytes while the response head is still coming: counted against its cap (the
        parser itself would hold an endless header line in memory)."""
        self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except _PARSE_ERRORS as exc:
            self._parse_failed(r, data, exc)
            return
        if not r._headers_done and self.head_bytes > _MAX_HEAD_BYTES:
            r._fail(MalformedResponseError(f"response head over {_MAX_HEAD_BYTES // 1024} KiB"))

    def _parse_failed(self, r: Http1Response, data: bytes, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserCallbackError):
            if self.head_stop:
                # A HEAD response ends with its headers; the parser cannot be told so.
                self.head_stop = False
                self.parser = httptools.HttpResponseParser(self)
                # Reusable only if nothing came after the headers (no stray body).
                keep = self.head_keep and data.endswith(b"\r\n\r\n")
                self._complete(r, keep)
            elif r._complete:
                # Stray bytes after a complete response (the connection may already be idle).
                self.close()
            elif isinstance(exc.__context__, _Malformed):
                r._fail(MalformedResponseError(str(exc.__context__)))
            else:
                r._fail(BrokenResponseError(f"response parsing stopped: {exc.__context__!r}"))
        elif isinstance(exc, httptools.HttpParserUpgrade):
            r._fail(MalformedResponseError("the server switched protocols (not supported)"))
        elif r._complete:
            self.close()
        else:
            r._fail(MalformedResponseError(f"malformed response: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._forget(self)
        self._wake_drain()
        r = self.resp
        if r is None:
            return
        self.resp = None
        r._conn = None
        why = f" ({exc!r})" if exc is not None else ""
        if not r._headers_done:
            if self.reused and not self.head_bytes:
                r._fail(_StaleConnectionError(f"reused connection closed{why}"))
            else:
                r._fail(BrokenResponseError(f"connection closed before response headers{why}"))
        elif exc is None and not r._spoiled and r._until_close():
            r._complete = True
            r._wake()
        else:
            r._fail(BrokenResponseError(f"connection closed mid-body{why}"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        r = self.resp
        if r is None or r._complete:
            raise _StopParsing  # a second response nobody asked for

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > _MAX_HEADER_LINE:
            raise _Malformed(f"a response header line over {_MAX_HEADER_LINE // 1024} KiB")
        self.resp.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        r = cast(Http1Response, self.resp)
        status: int = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                raise _Malformed("the server switched protocols (not supported)")
            if status < 100:
                raise _Malformed(f"malformed response: status {status}")
            r.headers = []  # 1xx informational: the real response follows
            return
        if status > 599:
            raise _Malformed(f"malformed response: status {status}")
        r.status = status
        r._headers_done = True
        r._wake()
        if r._head:
            self.head_keep = bool(self.parser.should_keep_alive())
            self.head_stop = True
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        r = cast(Http1Response, self.resp)
        r._chunks.append(body)
        n = r._buffered + len(body)
        r._buffered = n
        if n > r._peak_buffered:
            r._peak_buffered = n
        if n > _HIGH_WATER and not self.read_paused:
            t = self.transport
            if t is not None and not t.is_closing():
                self.read_paused = True
                t.pause_reading()
        waiter = r._waiter
        if waiter is not None:
            r._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def on_message_complete(self) -> None:
        r = cast(Http1Response, self.resp)
        if not r._headers_done:
            return  # the end of a 1xx informational response
        self._complete(r, bool(self.parser.should_keep_alive()))

    def _complete(self, r: Http1Response, keep: bool) -> None:
        """The response arrived in full: wake its reader, give the connection back."""
        r._complete = True
        r._keep = keep = keep and not r._spoiled
        r._conn = None
        self.resp = None
        r._wake()
        self.pool._release(self, keep)


class Http1Pool:
    """HTTP/1.1 connections to any number of ``http://host:port`` origins, reused LIFO."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        keepalive_s: float = 60.0,
        max_idle_per_host: int = 64,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_idle_per_host = max_idle_per_host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[Key, list[_Conn]] = {}
        self._conns: set[_Conn] = set()
        self._urls: dict[str, tuple[Key, bytes]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._methods: dict[str, bytes] = {}
        self._prune_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self.connects = 0  # connections opened so far (tests and metrics read it)

    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        headers_timeout_s: float | None,
        idle_timeout_s: float | None,
    ) -> Http1Response:
        """Send a request; return once the response's status line and headers arrived."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        target = self._urls.get(url)
        if target is None:
            target = self._parse_url(url)
        key, tail = target
        mb = self._methods.get(method)
        if mb is None:
            mb = self._method(method)
        if self._closed:
            raise ConnectError("the pool is closed")
        parts = [mb, tail]
        for name, value in headers:
            if name.lower() in _OWN_HEADERS:
                continue
            if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
                raise ValueError(f"CR or LF in request header {name!r}")
            parts += (name, b": ", value, b"\r\n")
        head = method == "HEAD"
        if body is None or isinstance(body, bytes):
            if body is None:
                parts.append(b"Content-Length: 0\r\n\r\n" if method in _BODY_METHODS else b"\r\n")
            else:
                parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
                parts.append(body)
            request = b"".join(parts)
            conn = self._take_idle(key, loop)
            if conn is not None:
                try:
                    return await self._exchange(
                        conn, request, None, head, headers_timeout_s, idle_timeout_s
                    )
                except _StaleConnectionError:
                    pass  # the server closed it as we sent: once more on a fresh one
            conn = await self._connect(key, loop)
            try:
                return await self._exchange(
                    conn, request, None, head, headers_timeout_s, idle_timeout_s
                )
            except _StaleConnectionError as exc:  # pragma: no cover - fresh ones are not reused
                raise BrokenResponseError(str(exc)) from None
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        conn = self._take_idle(key, loop) or await self._connect(key, loop)
        try:
            return await self._exchange(
                conn, b"".join(parts), body, head, headers_timeout_s, idle_timeout_s
            )
        except _StaleConnectionError as exc:
            raise BrokenResponseError(f"{exc} (the streamed body cannot be replayed)") from None

    async def close(self) -> None:
        """Close every connection (responses being read fail with BrokenResponseError)."""
        self._closed = True
        if self._prune_handle is not None:
            self._prune_handle.cancel()
            self._prune_handle = None
        for conn in list(self._conns):
            conn.close()
        self._idle.clear()
        if self._conns:
            # Let the transports finish closing (connection_lost) before the loop goes away.
            await asyncio.sleep(0)

    def pool_stats(self) -> tuple[int, int]:
        """(idle pooled connections, connections in use)."""
        idle = sum(len(v) for v in self._idle.values())
        return idle, len(self._conns) - idle

    def stats(self) -> dict[str, int]:
        """Open connections, idle ones, and connections opened so far."""
        idle = sum(len(v) for v in self._idle.values())
        return {"open": len(self._conns), "idle": idle, "connects": self.connects}

    # -- internals --

    async def _exchange(
        self,
        conn: _Conn,
        request: bytes,
        stream: AsyncIterable[bytes] | None,
        head: bool,
        headers_timeout_s: float | None,
        idle_timeout_s: float | None,
    ) -> Http1Response:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        r = Http1Response(conn, loop, head, idle_timeout_s)
        conn.resp = r
        conn.head_bytes = 0
        transport = cast(asyncio.Transport, conn.transport)
        transport.write(request)
        try:
            if stream is not None:
                await self._send_stream(conn, r, transport, stream)
            while not r._headers_done:
                if r._error is not None:
                    raise r._error
                await r._wait(headers_timeout_s, HeadersTimeoutError)
        except BaseException:
            r._fail(BrokenResponseError("the request failed"))
            raise
        return r

    async def _send_stream(
        self,
        conn: _Conn,
        r: Http1Response,
        transport: asyncio.Transport,
        stream: AsyncIterable[bytes],
    ) -> None:
        """Send a chunked body. Until its last chunk is out, the connection is not reusable."""
        r._spoiled = True
        async for chunk in stream:
            if r._headers_done or r._error is not None or transport.is_closing():
                # The server answered (or failed) before the body's end: stop sending; the
                # request stays incomplete, so the connection is closed after this response.
                return
            if chunk:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if conn.write_paused:
                    await conn.drain()
        if r._error is None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
            r._spoiled = False

    def _take_idle(self, key: Key, loop: asyncio.AbstractEventLoop) -> _Conn | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = -1.0
        while idle:
            conn = idle.pop()
            t = conn.transport
            if conn.lost or t is None or t.is_closing():
                continue
            if now < 0:
                now = loop.time()
            if now - conn.idle_since >= self.keepalive_s:
                # LIFO: everything under it is older still.
                conn.close()
                for old in idle:
                    old.close()
                idle.clear()
                return None
            conn.reused = True
            return conn
        return None

    async def _connect(self, key: Key, loop: asyncio.AbstractEventLoop) -> _Conn:
        conn = _Conn(self, key)
        host, port, tls = key
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if tls:
                    await loop.create_connection(
                        lambda: conn, host, port, ssl=self._tls(), server_hostname=host
                    )
                else:
                    await loop.create_connection(lambda: conn, host, port)
        except TimeoutError as exc:
            raise ConnectError(
                f"connect timed out after {self.connect_timeout_s:g}s",
                address=_address(host, port),
            ) from exc
        except OSError as exc:
            raise ConnectError(connect_failure(exc), address=_address(host, port)) from exc
        self.connects += 1
        if self._closed:
            conn.close()
            raise ConnectError("the pool is closed")
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Conn, keep: bool) -> None:
        """A connection whose response completed: idle it for reuse, or close it."""
        t = conn.transport
        if not keep or self._closed or conn.lost or t is None or t.is_closing():
            conn.close()
            return
        if conn.read_paused:
            conn.resume_reading()
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        conn.idle_since = loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if len(idle) > self.max_idle_per_host:
            idle.pop(0).close()
        if self._prune_handle is None:
            self._prune_handle = loop.call_later(self.keepalive_s, self._prune)

    def _forget(self, conn: _Conn) -> None:
        """connection_lost: the connection is gone from the pool."""
        self._conns.discard(conn)
        idle = self._idle.get(conn.key)
        if idle:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def _prune(self) -> None:
        """Close connections idle for ``keepalive_s``; come back when the next one expires."""
        self._prune_handle = None
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        now = loop.time()
        oldest: float | None = None
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= self.keepalive_s:
                idle.pop(0).close()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None and not self._closed:
            delay = max(oldest + self.keepalive_s - now, 0.01)
            self._prune_handle = loop.call_later(delay, self._prune)

    def _method(self, method: str) -> bytes:
        if not method or not set(method) <= _TOKEN:
            raise ValueError(f"bad HTTP method {method!r}")
        mb = method.encode("ascii")
        if len(self._methods) < 64:
            self._methods[method] = mb
        return mb

    def _tls(self) -> ssl.SSLContext:
        """The TLS context for ``https://`` backends: the system's CAs, verified."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _parse_url(self, url: str) -> tuple[Key, bytes]:
        """``http://host[:port]/path?query`` → ((host, port), the request line's tail + Host)."""
        scheme = url[:8].lower()
        if scheme.startswith("http://"):
            tls, rest, default_port = False, url[7:], 80
        elif scheme == "https://":
            tls, rest, default_port = True, url[8:], 443
        else:
            raise ValueError(f"only http:// and https:// URLs are supported: {url!r}")
        cut = len(rest)
        for sep in "/?#":
            i = rest.find(sep)
            if 0 <= i < cut:
                cut = i
        authority, path = rest[:cut], rest[cut:].partition("#")[0]
        if not path or path[0] == "?":
            path = "/" + path
        if "@" in authority:
            raise ValueError(f"credentials in URLs are not supported: {url!r}")
        if authority.startswith("["):
            end = authority.find("]")
            if end < 0:
                raise ValueError(f"bad IPv6 address in {url!r}")
            host, port_s = authority[1:end], authority[end + 1 :]
            if port_s and not port_s.startswith(":"):
                raise ValueError(f"bad port in {url!r}")
            port_s = port_s[1:]
            host_header = f"[{host}]"
        else:
            host, _, port_s = authority.partition(":")
            host_header = host
        if not host:
            raise ValueError(f"no host in {url!r}")
        if port_s:
            if not port_s.isdigit() or not 0 < int(port_s) < 65536:
                raise ValueError(f"bad port in {url!r}")
            port = int(port_s)
        else:
            port = default_port
        if port != default_port:
            host_header = f"{host_header}:{port}"
        if any(c in path or c in host_header for c in _BAD_TARGET):
            raise ValueError(f"whitespace or control characters in {url!r}")
        tail = f" {path} HTTP/1.1\r\nHost: {host_header}\r\n".encode("ascii")
        target = ((host, port, tls), tail)
        if len(self._urls) >= _URL_CACHE_MAX:
            self._urls.clear()
        self._urls[url] = target
        return target


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# What a failed connect says to a client: the errno's words, never the address (the OS's
# message for a refused connect names it: "Connect call failed ('127.0.0.1', 11435)").
_CONNECT_ERRNO = {
    errno.ECONNREFUSED: "connection refused",
    errno.ETIMEDOUT: "connect timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset",
    errno.EADDRNOTAVAIL: "address not available",
}


def connect_failure(exc: OSError) -> str:
    """Why a connect failed, in words a client may read (no address)."""
    if isinstance(exc, socket.gaierror):
        return "host name not resolved"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    if exc.errno in _CONNECT_ERRNO:
        return _CONNECT_ERRNO[exc.errno]
    # asyncio's "Multiple exceptions: ..." (several addresses tried) has no errno of its own.
    for sub in getattr(exc, "exceptions", ()) or ():
        if isinstance(sub, OSError) and sub.errno in _CONNECT_ERRNO:
            return _CONNECT_ERRNO[sub.errno]
    return "connect failed" if exc.errno is None else f"connect failed (errno {exc.errno})"
