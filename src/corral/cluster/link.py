"""The one way to the cluster's Redis: every call under a time bound, failures as one episode.

A call that fails or takes longer than ``timeout_s`` marks the link down (logged once per
episode) and raises :class:`ClusterUnavailableError`; callers then decide locally. While the
link is down nobody calls Redis on the request path (callers check :attr:`RedisLink.up`), so a
dead Redis costs a request nothing; the cluster's supervisor probes it and brings it back.

The URL carries the password: it is never logged. Log lines name the host and port only, and
any error text is scrubbed of the password before it is logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from corral.errors import CorralError

log = structlog.get_logger("corral.cluster")

T = TypeVar("T")

# What a failed Redis call raises, whatever went wrong underneath.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


class ClusterUnavailableError(CorralError):
    """Redis did not answer (in time): decide locally. Never reaches a client."""


def where(url: str) -> str:
    """What logs may say about a Redis URL: scheme, host and port (never user or password)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.scheme}://{host}:{port}"


class Keys:
    """Every key and channel of one fleet, all under ``{name}:`` so fleets can share a Redis."""

    def __init__(self, name: str) -> None:
        self.prefix = f"{name}:"
        self.freed = f"{name}:freed"  # channel: units were given back
        self.taken = f"{name}:taken"  # channel: units were granted
        self.state = f"{name}:state"  # channel: control state changed
        self.waiting = f"{name}:waiting"  # channel: a replica's most urgent waiter
        self.wanted = f"{name}:wanted"  # channel: a replica wants units of a backend
        self.state_version = f"{name}:state:version"
        self.state_kinds = f"{name}:state:kinds"
        self.state_prefix = f"{name}:state:kind:"
        self.state_epoch = f"{name}:state:epoch"  # which copy of the state Redis holds
        self.leader = f"{name}:leader"

    def slots(self, backend_id: str) -> str:
        return f"{self.prefix}slots:{backend_id}"

    def state_kind(self, kind: str) -> str:
        return f"{self.state_prefix}{kind}"

    def bucket(self, name: str) -> str:
        return f"{self.prefix}bucket:{name}"


class RedisLink:
    """A ``redis.asyncio`` client with a deadline on every call and an up/down state."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_connections: int = 64,
        on_down: Callable[[], None] | None = None,
    ) -> None:
        self.where = where(url)
        self.timeout_s = timeout_s
        parts = urlsplit(url)
        # The password as written and as Redis receives it: both are scrubbed from log text.
        self._secrets = [s for s in {parts.password, unquote(parts.password or "")} if s]
        self._on_down = on_down
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # No retries underneath: a failure is reported at once and the caller goes local.
            retry=Retry(NoBackoff(), 0),
        )
        self.redis: Redis = Redis.from_pool(pool)  # closing the client closes the pool
        self.up = False
        self.calls = 0  # round trips to Redis (bench/cluster.py reads it)
        self.episodes = 0  # times Redis became unreachable
        self.down_since: float | None = time.monotonic()
        self._announced = False  # the first failure of this episode was logged
        self._joined = False
        self.down = asyncio.Event()  # set while down: the supervisor waits on it
        self.down.set()

    async def run(self, call: Awaitable[T], timeout_s: float | None = None) -> T:
        """Await one Redis call under the deadline; on any failure mark the link down and
        raise ClusterUnavailableError."""
        self.calls += 1
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                result = await call
        except REDIS_FAILURES as exc:
            honour_cancel()
            self.fail(exc)
            raise ClusterUnavailableError(self.scrub(describe(exc))) from None
        honour_cancel()
        return result

    def fail(self, exc: BaseException | str) -> None:
        """Redis failed: mark down, log once for this episode."""
        if self.up or not self._announced:
            self.episodes += self.up
            self.up = False
            self.down_since = time.monotonic()
            self.down.set()
            self._announced = True
            text = exc if isinstance(exc, str) else describe(exc)
            log.warning(
                "cluster Redis unreachable; serving on the local view",
                redis=self.where,
                error=self.scrub(text),
            )
            if self._on_down is not None:
                self._on_down()

    def recovered(self) -> None:
        """Redis answers and the replica is resynchronised: mark up, log once."""
        if self.up:
            return
        self.up = True
        self.down.clear()
        if not self._joined and not self._announced:
            log.info("cluster joined", redis=self.where)
        else:
            down_s = time.monotonic() - self.down_since if self.down_since is not None else 0.0
            log.info(
                "cluster Redis reachable again; state resynchronised",
                redis=self.where,
                down_s=round(down_s, 3),
            )
        self.down_since = None
        self._announced = False
        self._joined = True

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.aclose()
        except (*REDIS_FAILURES, RuntimeError):  # closing what is already gone
            pass


def describe(exc: BaseException) -> str:
    """An error for a log line: its type and message (a bare timeout says so)."""
    return (
        f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__}: no answer in time"
    )


def decode(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def honour_cancel() -> None:
    """Raise CancelledError if this task was cancelled during a Redis call.

    redis-py (8.2, on Python 3.11) sometimes absorbs a cancellation that arrives while a
    command is on the wire (the call then returns, or fails with a ConnectionError); the task
    stays marked as cancelling, so the cancellation is honoured here instead of lost.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
