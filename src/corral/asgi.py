"""Raw ASGI: the types, header lookup, request ids and the one disconnect watcher.

The hot path is a pure-ASGI handler (no framework per request); everything here is shared by
the front door, the fan-out routes and the simulator.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
_T = TypeVar("_T")

# Request ids: a random per-process prefix plus a counter (unique, and no syscall per request).
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count(1)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the lower-case header ``name``, decoded as Latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is sane, else a new one."""
    text = header(scope, b"x-request-id")
    # ASCII only: other bytes would not come back (nor reach the backend) as they were sent.
    if text is not None and 0 < len(text) <= 128 and text.isascii() and text.isprintable():
        return text
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


class BodyTooLargeError(ValueError):
    """A compressed body that decodes to more than the limit."""


def zstd_decoded(body: bytes, limit: int) -> bytes:
    """A ``Content-Encoding: zstd`` body, decoded, at most ``limit`` bytes of it (a small body
    may decode to gigabytes). BodyTooLargeError past the limit, ValueError when it is not zstd."""
    import zstandard  # only when a client compresses

    parts: list[bytes] = []
    size = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            while chunk := reader.read(min(limit + 1 - size, 1 << 20) or 1):
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise BodyTooLargeError(f"the zstd body decodes to more than {limit} bytes")
    except zstandard.ZstdError as exc:
        raise ValueError(f"invalid zstd body: {exc}") from None
    return b"".join(parts)


def form_field(body: bytes, content_type: str, name: str) -> str | None:
    """The text of field ``name`` in a ``multipart/form-data`` body (None when absent or not
    multipart). Found by scanning: the upload is neither parsed into parts nor copied."""
    ctype, _, params = content_type.partition(";")
    if ctype.strip().lower() != "multipart/form-data":
        return None
    boundary = None
    for param in params.split(";"):
        key, _, given = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = given.strip().strip('"')
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode("latin-1")
    wanted = (f'name="{name}"').encode()
    start = body.find(delimiter)
    while start >= 0:
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0:
            return None
        following = body.find(delimiter, head_end)
        if following < 0:
            return None
        head = body[start:head_end]
        if wanted in head and b"filename=" not in head:
            found = body[head_end + 4 : following]
            return found.removesuffix(b"\r\n").decode("utf-8", "replace")
        start = following
    return None


async def disconnected(receive: Receive) -> None:
    """Return once the client has gone away (request body messages are skipped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class DisconnectWatcher:
    """Cancels the task serving a request when its client goes away.

    Armed ``after_s`` late, so that short requests finish before it and never pay for the
    watcher's task. Use as a context manager around the work; afterwards :attr:`gone` says
    whether the client left (the cancellation it caused has then been taken back with
    ``uncancel``, so the caller can still log and count the request).
    """

    __slots__ = ("_armed", "_receive", "_task", "_watch", "gone")

    def __init__(self, receive: Receive, *, after_s: float = 0.05) -> None:
        self._receive = receive
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watch: asyncio.Future[None] | None = None
        self.gone = False
        self._armed = asyncio.get_running_loop().call_later(after_s, self._arm)

    def _arm(self) -> None:
        self._watch = asyncio.ensure_future(disconnected(self._receive))
        self._watch.add_done_callback(self._on_done)

    def _on_done(self, watch: asyncio.Future[None]) -> None:
        if not watch.cancelled() and watch.exception() is None:
            self.gone = True
            self._task.cancel()

    def __enter__(self) -> DisconnectWatcher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        self._armed.cancel()
        if self._watch is not None:
            self._watch.remove_done_callback(self._on_done)
            self._watch.cancel()
        if self.gone and isinstance(exc, asyncio.CancelledError):
            self._task.uncancel()
            return True  # the client left: swallowed, the caller sees ``gone``
        return False


async def unless_gone(receive: Receive, work: Awaitable[_T]) -> _T | None:
    """Run ``work``; cancel it and answer None if the client disconnects first."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait((job, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watcher, job):
            task.cancel()
        await asyncio.gather(watcher, job, return_exceptions=True)
    return None if job.cancelled() else job.result()
