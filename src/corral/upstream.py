"""The one seam to backends: a shared aiohttp ClientSession."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from corral.config import TimeoutSettings

# Errors that mean "the backend did not answer": safe to retry elsewhere before the first byte.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    ConnectionError,
)


class Upstream:
    """Opens requests to backends. One session (one pool) for proxying and health checks."""

    def __init__(self, timeouts: TimeoutSettings) -> None:
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=timeouts.connect_s,
            sock_read=timeouts.first_token_s,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No total deadline: generations run for minutes. Per-phase limits instead.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
                ),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def open(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
    ) -> aiohttp.ClientResponse:
        """Send a request and return once the response headers arrived.

        The wait for headers is bounded by ``first_token_s`` (Ollama sends its headers with the
        first token, so this covers queueing and cold loads); later gaps by ``idle_s``.
        """
        resp = await self.session.request(
            method, url, headers=headers, data=body, timeout=self._timeout, allow_redirects=False
        )
        conn = resp.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.read_timeout = self.timeouts.idle_s
        return resp

    async def get_json(self, url: str, timeout_s: float) -> Any:
        """GET ``url`` and decode JSON; raises on transport errors, timeouts and non-2xx."""
        return json.loads(await self.get_bytes(url, timeout_s))

    async def get_bytes(self, url: str, timeout_s: float) -> bytes:
        """GET ``url``'s body; raises on transport errors, timeouts and non-2xx."""
        timeout = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=min(timeout_s, self.timeouts.connect_s)
        )
        async with self.session.get(url, timeout=timeout, allow_redirects=False) as resp:
            body = await resp.read()
            if resp.status >= 400:
                raise aiohttp.ClientResponseError(
                    resp.request_info,
                    resp.history,
                    status=resp.status,
                    message=body[:200].decode(errors="replace"),
                )
            return body

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
            # Let the transports finish closing before the loop goes away.
            await asyncio.sleep(0)
