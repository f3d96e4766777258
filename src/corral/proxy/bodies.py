"""Request bodies: read whole, within a size limit, a pause limit and a fleet-wide budget.

corral reads a body whole before it forwards it (it needs the model, and a retry must resend
it). Three limits keep that from being turned against it:

- each body at most ``limit`` bytes (``server.max_body_mb``; a route may have its own): 413;
- no pause longer than ``timeout_s`` between two reads (``server.body_timeout_s``, nginx's
  ``client_body_timeout``): a client that stops sending gets 408 and its connection closed;
- at most ``budget`` bytes held at once across all requests (``server.max_buffered_mb``): a
  body stays counted until its request ends (it waits in the queue and is resent on retries),
  and one that would go past the budget is refused with 503 + Retry-After. Forty stalled
  19 MB uploads cannot take corral's memory any more.

Every refusal but the 413 is counted in ``corral_edge_refusals_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

from corral.asgi import Headers, Receive, Scope
from corral.errors import RequestError
from corral.metrics import Metrics

_CLOSE = (b"connection", b"close")


class BodyRefusedError(RequestError):
    """The body was refused; ``headers`` go with the answer."""

    def __init__(self, message: str, status: int, headers: Headers) -> None:
        super().__init__(message, status)
        self.headers = headers


class Bodies:
    """Reads request bodies for corral's handlers (see the module docstring)."""

    def __init__(
        self, limit: int, timeout_s: float, budget: int, metrics: Metrics | None = None
    ) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self.budget = budget
        self.metrics = metrics
        self.held = 0  # bytes of bodies held now, across all requests
        # Bodies being read, and when each must have received its next chunk: one sweeper
        # lets go of stalled ones (a timer per read would cost every request microseconds).
        self._reading: dict[Body, float] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def read(self, scope: Scope, receive: Receive, limit: int | None = None) -> Body:
        """``async with bodies.read(scope, receive) as body:`` the whole body (None when the
        client left), held against the budget until the block ends. Entering raises
        BodyRefusedError (or RequestError 413)."""
        return Body(self, scope, receive, limit or self.limit)

    def too_large(self, limit: int | None = None) -> RequestError:
        limit = limit or self.limit
        which = "server.max_body_mb" if limit == self.limit else "this route's own"
        return BodyRefusedError(
            f"request body too large: the limit is {limit / 1_000_000:g} MB ({which})",
            413,
            [_CLOSE],
        )

    def _refuse(self, reason: str, message: str, status: int, headers: Headers) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.edge_refusals, reason).inc()
        raise BodyRefusedError(message, status, headers)

    def _watch(self, body: Body, deadline: float) -> None:
        self._reading[body] = deadline
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Every fraction of ``timeout_s``, cancel the reads whose client sent nothing since
        their deadline; ends when nothing is being read."""
        loop = asyncio.get_running_loop()
        every = min(self.timeout_s / 4, 1.0)
        while self._reading:
            await asyncio.sleep(every)
            now = loop.time()
            for body, deadline in list(self._reading.items()):
                if now >= deadline:
                    del self._reading[body]
                    body.expire()

    async def close(self) -> None:
        """Stop the sweeper (corral stops)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    def _take(self, size: int) -> None:
        if self.held + size > self.budget:
            self._refuse(
                "buffered_bytes",
                "corral holds too many request bodies at once; retry shortly",
                503,
                [(b"retry-after", b"1"), _CLOSE],
            )
        self.held += size


class Body:
    """One request's body, read on entering and given back to the budget on leaving."""

    __slots__ = ("_bodies", "_expired", "_held", "_limit", "_receive", "_scope", "_task")

    def __init__(self, bodies: Bodies, scope: Scope, receive: Receive, limit: int) -> None:
        self._bodies = bodies
        self._scope = scope
        self._receive = receive
        self._limit = limit
        self._held = 0
        self._task: asyncio.Task[Any] | None = None
        self._expired = False

    def expire(self) -> None:
        """The client sent nothing for too long: stop waiting for it (see :meth:`take`)."""
        self._expired = True
        if self._task is not None:
            self._task.cancel()

    async def take(self) -> bytes | None:
        """Read the body (None: the client left); raises as :meth:`Bodies.read` says."""
        try:
            return await self._read()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the body's bytes back to the budget (the request ended)."""
        self._bodies.held -= self._held
        self._held = 0

    async def __aenter__(self) -> bytes | None:
        return await self.take()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _take(self, size: int) -> None:
        self._bodies._take(size)
        self._held += size

    async def _read(self) -> bytes | None:
        bodies, limit = self._bodies, self._limit
        for key, value in self._scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    raise bodies.too_large(limit)
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        reading = bodies._reading
        bodies._watch(self, loop.time() + bodies.timeout_s)
        try:
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk: bytes = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        raise bodies.too_large(limit)
                    self._take(len(chunk))
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if self in reading:
                    reading[self] = loop.time() + bodies.timeout_s
        except asyncio.CancelledError:
            if not self._expired or self._task is None:
                raise
            self._task.uncancel()
            bodies._refuse(
                "body_timeout",
                f"request body timeout: nothing received for {bodies.timeout_s:g}s",
                408,
                [_CLOSE],
            )
            raise  # not reached: _refuse raises
        finally:
            reading.pop(self, None)
            self._task = None


def refusal_headers(exc: RequestError) -> Headers | None:
    """Headers for corral's answer to a refused request (413 and 408 close the connection:
    the rest of the body is not read)."""
    if isinstance(exc, BodyRefusedError):
        return exc.headers
    return [(b"connection", b"close")] if exc.status == 413 else None


__all__ = ["Bodies", "Body", "BodyRefusedError", "refusal_headers"]
