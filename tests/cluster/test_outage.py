"""Redis stopped, frozen or refusing: replicas keep serving on their local view, say so once,
and resynchronise when Redis is back. The password never reaches a log line."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from tests.cluster.conftest import LEASE_S, PASSWORD, ClusterFactory, RedisServer
from tests.helpers import until

pytestmark = pytest.mark.cluster

PROMPT_S = 0.5  # a call while Redis is away answers well within this (timeout: 0.25 s)


async def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = await call
    return result, time.monotonic() - started


async def test_redis_stopped_mid_use_then_back(
    cluster_factory: ClusterFactory, redis_server: RedisServer
) -> None:
    """Stop Redis while replicas hold leases: calls answer at once from the local view, the
    gauge says 0; restart it: both replicas resynchronise (leases, state) and the gauge says 1."""
    registry = CollectorRegistry()
    a = await cluster_factory(registry=registry, retry_s=0.1)
    b = await cluster_factory(retry_s=0.1)
    b.watch(["gpu0"])
    assert registry.get_sample_value("corral_cluster_up") == 1.0
    first = await a.acquire("gpu0", 2)
    assert first is not None
    assert first.shared
    held = [first]

    redis_server.stop()
    lease, took = await timed(a.acquire("gpu0", 2))
    assert took < PROMPT_S
    assert lease is not None
    assert not lease.shared
    held.append(lease)
    assert not a.up
    assert registry.get_sample_value("corral_cluster_up") == 0.0
    full, took = await timed(a.acquire("gpu0", 2))
    assert full is None
    assert took < PROMPT_S
    assert a.in_flight("gpu0") == 2
    allowed, took = await timed(a.take("team-a", 1, 1))
    assert allowed is None
    assert took < PROMPT_S
    _, took = await timed(a.set_state("drains", "gpu1", True))
    assert took < PROMPT_S
    assert a.state("drains") == {"gpu1": True}
    _, took = await timed(a.release(held.pop(0)))
    assert took < PROMPT_S
    await until(lambda: not b.up, 2.0)

    redis_server.start()  # empty: no persistence
    await until(lambda: a.up and b.up, 3.0)
    assert registry.get_sample_value("corral_cluster_up") == 1.0
    # What a changed while Redis was away reached b; a's live lease is back in Redis.
    await until(lambda: b.state("drains") == {"gpu1": True}, 1.0)
    await until(lambda: b.in_flight("gpu0") == 1, LEASE_S)
    assert await b.acquire("gpu0", 2) is not None
    assert await b.acquire("gpu0", 2) is None  # a's lease and b's: full fleet-wide
    await until(lambda: a.is_leader != b.is_leader, LEASE_S + 0.5)


async def test_frozen_redis_never_stalls(
    cluster_factory: ClusterFactory, redis_server: RedisServer
) -> None:
    """A Redis that hangs (SIGSTOP) costs a call at most its timeout, once: then the replica
    serves locally without asking; the leader keeps its lock only until its TTL would end."""
    a = await cluster_factory(retry_s=0.1)
    await until(lambda: a.is_leader, LEASE_S)
    redis_server.freeze()
    try:
        lease, took = await timed(a.acquire("gpu0", 4))
        assert lease is not None
        assert took < PROMPT_S
        assert not a.up
        for _ in range(20):  # no Redis call at all now: each answers at once
            lease, took = await timed(a.acquire("gpu0", 100))
            assert lease is not None
            assert took < 0.01
        assert a.is_leader  # for now: its lock is still valid in Redis
        await until(lambda: not a.is_leader, LEASE_S)
    finally:
        redis_server.thaw()
    await until(lambda: a.up, 3.0)
    await until(lambda: a.is_leader, LEASE_S)


async def test_password_never_logged(
    cluster_factory: ClusterFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Joining, losing Redis, coming back and a wrong password: the logs name the host and
    port, never a password."""
    wrong = "Wr0ng-pa55word-never-logged"
    with capture_logs() as logs, caplog.at_level(logging.DEBUG):
        a = await cluster_factory(retry_s=0.1)
        redis_server.stop()
        await a.acquire("gpu0", 1)
        redis_server.start()
        await until(lambda: a.up, 3.0)
        intruder = await cluster_factory(url=redis_server.url.replace(PASSWORD, wrong))
        assert not intruder.up
    text = repr(logs) + caplog.text
    events = [entry["event"] for entry in logs]
    assert "cluster Redis unreachable; serving on the local view" in events
    assert "cluster Redis reachable again; state resynchronised" in events
    assert f"127.0.0.1:{redis_server.port}" in text
    assert PASSWORD not in text
    assert wrong not in text
