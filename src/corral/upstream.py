"""The one way to a backend: ``Upstream`` over a ``Transport``.

Every byte corral sends to an Ollama goes through here: routed requests, fan-out management,
health probes, GPU exporters and model loads. The transport is a small protocol (like httpx's
``transport=``), so tests drive the forwarder, fan-out and placement with a scripted fake and
no sockets. The HTTP client's own exceptions are translated into corral's tree
(``UpstreamConnectError``, ``UpstreamTimeoutError``, ``UpstreamBrokenError``,
``UpstreamMalformedError``) inside the transport, and nowhere else; their messages name no
host or port (clients read them), the error's ``address`` does (logs read it).

What a backend may make corral do is bounded here: a 3xx is an ``UpstreamRedirectError``
(never followed, never relayed), and a body read whole (:meth:`Upstream.request` and what is
built on it: probes, listings, GPU exporter pages, placement answers) stops at
``MAX_BODY_BYTES`` (``MAX_ERROR_BYTES`` for a 4xx/5xx body) with an ``UpstreamTooLargeError``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol
from urllib.parse import urlsplit

from corral.config import TimeoutSettings
from corral.errors import (
    UpstreamBadBodyError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamMalformedError,
    UpstreamRedirectError,
    UpstreamTimeoutError,
    UpstreamTooLargeError,
)

Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes] | None

# The most of a backend's answer corral holds in memory at once: a model list (/api/tags of a
# few hundred models is ~200 KB), a version, a DCGM page, a placement answer.
MAX_BODY_BYTES = 8 * 1024 * 1024
# An error body (4xx/5xx) read whole: Ollama's are one short JSON line.
MAX_ERROR_BYTES = 1024 * 1024


class Response(Protocol):
    """A backend's answer, its headers in; the body is read chunk by chunk as it arrives."""

    status: int
    headers: Headers  # as received, names lower-cased

    def header(self, name: bytes) -> bytes | None:
        """The first value of a lower-case header name."""
        ...

    async def read(self) -> bytes:
        """The next chunk as soon as any bytes arrive; ``b""`` once the body ended.
        Raises UpstreamTimeoutError after ``idle_s`` of silence, UpstreamBrokenError when the
        connection breaks."""
        ...

    def at_eof(self) -> bool:
        """The whole body has been handed out by :meth:`read`."""
        ...

    async def read_all(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the rest of the body."""
        ...

    def close(self) -> None:
        """Release the connection (reused when the body was read to its end)."""
        ...


class Transport(Protocol):
    """Sends one request and returns once the answer's headers arrived."""

    async def open(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body,
        *,
        headers_timeout_s: float | None,
        idle_timeout_s: float | None,
    ) -> Response: ...

    def pool_stats(self) -> tuple[int, int]:
        """(idle pooled connections, connections in use): for leak checks."""
        ...

    async def close(self) -> None: ...


class Upstream:
    """corral's client of its backends: the configured timeouts over one shared transport."""

    def __init__(self, timeouts: TimeoutSettings, transport: Transport | None = None) -> None:
        self.timeouts = timeouts
        if transport is None:
            from corral.http1 import Http1Pool

            transport = Http1Pool(connect_timeout_s=timeouts.connect_s)
        self.transport = transport

    async def open(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body = None,
        *,
        headers_timeout_s: float | None = None,
    ) -> Response:
        """Send a request; returns once the headers arrived.

        The wait for headers is bounded by ``first_token_s`` (Ollama sends its headers with the
        first token, so this covers queueing and cold loads); later gaps by ``idle_s``. A 3xx
        raises UpstreamRedirectError (its ``Location`` goes nowhere).
        """
        resp = await self.transport.open(
            method,
            url,
            headers,
            body,
            headers_timeout_s=headers_timeout_s or self.timeouts.first_token_s,
            idle_timeout_s=self.timeouts.idle_s,
        )
        if 300 <= resp.status < 400:
            resp.close()
            raise _redirect(resp, url)
        return resp

    async def request(
        self,
        method: str,
        url: str,
        timeout_s: float,
        *,
        headers: Headers | None = None,
        body: bytes | None = None,
        limit: int = MAX_BODY_BYTES,
    ) -> tuple[int, bytes]:
        """A whole exchange within ``timeout_s``: (status, body). Raises UpstreamError: an
        UpstreamTooLargeError for a body over ``limit`` (``MAX_ERROR_BYTES`` for a 4xx/5xx),
        an UpstreamRedirectError for a 3xx."""
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.transport.open(
                    method,
                    url,
                    headers or [],
                    body,
                    headers_timeout_s=timeout_s,
                    idle_timeout_s=timeout_s,
                )
                try:
                    status = resp.status
                    if 300 <= status < 400:
                        raise _redirect(resp, url)
                    cap = limit if status < 400 else min(limit, MAX_ERROR_BYTES)
                    return status, await read_capped(resp, cap)
                finally:
                    resp.close()
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"{_path(url)}: no answer within {timeout_s:g}s", address=url
            ) from None
        except UpstreamError as exc:
            if exc.address is None:
                exc.address = url
            raise

    async def get_bytes(self, url: str, timeout_s: float, limit: int = MAX_BODY_BYTES) -> bytes:
        """GET ``url``'s body; raises UpstreamError on failures, timeouts, non-2xx and a body
        over ``limit``."""
        status, body = await self.request("GET", url, timeout_s, limit=limit)
        if status >= 400:
            text = body[:200].decode(errors="replace")
            raise UpstreamBrokenError(f"{_path(url)} answered {status}: {text}", address=url)
        return body

    async def get_json(self, url: str, timeout_s: float) -> Any:
        """GET ``url`` and decode JSON; raises UpstreamError (UpstreamBadBodyError for a body
        that is no JSON)."""
        body = await self.get_bytes(url, timeout_s)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            text = str(exc)[:200] or type(exc).__name__
            raise UpstreamBadBodyError(f"{_path(url)}: invalid JSON: {text}", address=url) from None

    async def post_json(self, url: str, payload: Any, timeout_s: float) -> tuple[int, Any]:
        """POST JSON within ``timeout_s``: (status, decoded answer, or {"error": text})."""
        headers = [(b"content-type", b"application/json")]
        status, raw = await self.request(
            "POST", url, timeout_s, headers=headers, body=json.dumps(payload).encode()
        )
        try:
            return status, json.loads(raw)
        except (ValueError, RecursionError):
            return status, {"error": raw[:200].decode(errors="replace")}

    async def close(self) -> None:
        await self.transport.close()


class AiohttpTransport:
    """The transport over one aiohttp ``ClientSession`` (kept for comparison: see the README's
    "Choices" for why :class:`corral.http1.Http1Pool` is the default)."""

    def __init__(self, connect_timeout_s: float) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._connect_timeout_s = connect_timeout_s
        self._session: Any = None
        self._errors = (aiohttp.ClientError, ConnectionError, OSError)

    def _client(self) -> Any:
        if self._session is None or self._session.closed:
            aiohttp = self._aiohttp
            # No total deadline: generations run for minutes. Per-phase limits instead.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def open(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body,
        *,
        headers_timeout_s: float | None,
        idle_timeout_s: float | None,
    ) -> Response:
        aiohttp = self._aiohttp
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout_s, sock_read=headers_timeout_s
        )
        try:
            resp = await self._client().request(
                method,
                url,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                data=body,
                timeout=timeout,
                allow_redirects=False,
            )
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamConnectError(
                f"connect timed out after {self._connect_timeout_s:g}s", address=url
            ) from None
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"no answer within {headers_timeout_s:g}s", address=url
            ) from None
        except aiohttp.ClientConnectorError as exc:
            from corral.http1 import connect_failure

            raise UpstreamConnectError(connect_failure(exc.os_error), address=url) from None
        except ConnectionRefusedError:
            raise UpstreamConnectError("connection refused", address=url) from None
        except aiohttp.ClientResponseError as exc:
            # aiohttp's parser refused the answer (a bad status line, a header over 8 KiB).
            text = str(exc.message).split("\n", 1)[0][:200]
            raise UpstreamMalformedError(f"malformed response: {text}", address=url) from None
        except self._errors as exc:
            raise UpstreamBrokenError(_describe(exc, url), address=url) from None
        conn = resp.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.read_timeout = idle_timeout_s
        return _AiohttpResponse(resp, self._errors, idle_timeout_s, url)

    def pool_stats(self) -> tuple[int, int]:
        if self._session is None:
            return 0, 0
        connector = self._session.connector
        idle = sum(
            1 for conns in connector._conns.values() for proto, _ in conns if proto.is_connected()
        )
        return idle, len(connector._acquired)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
            # Let the transports finish closing before the loop goes away.
            await asyncio.sleep(0)


class _AiohttpResponse:
    __slots__ = ("_errors", "_idle_s", "_resp", "_url", "headers", "status")

    def __init__(
        self,
        resp: Any,
        errors: tuple[type[BaseException], ...],
        idle_s: float | None,
        url: str,
    ) -> None:
        self._resp = resp
        self._errors = errors
        self._idle_s = idle_s
        self._url = url
        self.status: int = resp.status
        self.headers: Headers = [(k.lower(), v) for k, v in resp.raw_headers]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self) -> bytes:
        try:
            chunk: bytes = await self._resp.content.readany()
        except TimeoutError:
            raise UpstreamTimeoutError(f"no data for {self._idle_s:g}s") from None
        except self._errors as exc:
            raise UpstreamBrokenError(_describe(exc, self._url), address=self._url) from None
        return chunk

    def at_eof(self) -> bool:
        return bool(self._resp.content.is_eof())

    async def read_all(self, limit: int) -> bytes:
        try:
            data: bytes = await self._resp.content.read(limit)
        except TimeoutError:
            raise UpstreamTimeoutError(f"no data for {self._idle_s:g}s") from None
        except self._errors as exc:
            raise UpstreamBrokenError(_describe(exc, self._url), address=self._url) from None
        return data

    def close(self) -> None:
        self._resp.close()


def _describe(exc: BaseException, url: str) -> str:
    """An exception's message for a client: the backend's host and port taken out."""
    text = str(exc) or type(exc).__name__
    parts = urlsplit(url)
    for secret in (parts.netloc, parts.hostname):
        if secret:
            text = text.replace(secret, "<backend>")
    return text[:200]


def _path(url: str) -> str:
    """A backend URL's path (what a message may name), without scheme, host and port."""
    return urlsplit(url).path or "/"


def _redirect(resp: Response, url: str) -> UpstreamRedirectError:
    # The Location goes to the log only (through ``address``); never followed or relayed.
    location = (resp.header(b"location") or b"").decode("latin-1")[:200]
    where = f"{url} -> {location}" if location else url
    return UpstreamRedirectError(
        f"the backend answered a redirect ({resp.status}); corral does not follow redirects",
        address=where,
    )


async def read_capped(resp: Response, limit: int) -> bytes:
    """The rest of ``resp``'s body, or UpstreamTooLargeError once it passes ``limit`` bytes
    (the read stops there: the caller closes ``resp``, which drops the connection)."""
    declared = resp.header(b"content-length") or b""
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise UpstreamTooLargeError(f"a body of {declared.decode()} bytes, over corral's cap")
    data = await resp.read_all(limit + 1)
    if len(data) > limit:
        raise UpstreamTooLargeError(f"a body over corral's cap of {limit} bytes")
    return data


async def lines(resp: Response) -> AsyncIterator[bytes]:
    """The body split into lines (NDJSON progress), the last one even without its newline."""
    held = b""
    while chunk := await resp.read():
        held += chunk
        *done, held = held.split(b"\n")
        for line in done:
            yield line
    if held:
        yield held


__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ERROR_BYTES",
    "Response",
    "Transport",
    "Upstream",
    "UpstreamError",
    "lines",
    "read_capped",
]
