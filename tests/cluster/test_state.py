"""Shared control state: a change on one replica is applied by the others within a second."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from corral.cluster import Cluster
from tests.cluster.conftest import ClusterFactory, RedisServer
from tests.helpers import until

pytestmark = pytest.mark.cluster


async def test_set_state_reaches_another_replica_within_a_second(
    cluster_factory: ClusterFactory,
) -> None:
    """A strategy change, a drain and a registration on A are seen by B within 1 s, deletions
    too; B's callback hears each once, and A's own callback hears none of its own writes."""
    a, b = await cluster_factory(), await cluster_factory()
    heard_a: list[tuple[str, str, Any]] = []
    heard_b: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
    a.on_state(lambda *change: heard_a.append(change))
    b.on_state(lambda *change: heard_b.put_nowait(change))
    registration = {"url": "http://10.0.0.7:11434", "max_concurrent": 2, "ttl_s": 30}
    changes = [
        ("strategy", "current", "round_robin"),
        ("drains", "gpu0", True),
        ("backends", "gpu7", registration),
        ("drains", "gpu0", None),
    ]
    for kind, key, value in changes:
        started = time.monotonic()
        await a.set_state(kind, key, value)
        assert await asyncio.wait_for(heard_b.get(), 1.0) == (kind, key, value)
        assert time.monotonic() - started < 1.0
    assert b.state("strategy") == {"current": "round_robin"}
    assert b.state("backends") == {"gpu7": registration}
    assert b.state("drains") == {}
    assert a.state("backends") == b.state("backends")
    assert heard_a == []
    await a.set_state("strategy", "current", "round_robin")  # unchanged: no news for B
    await asyncio.sleep(0.1)
    assert heard_b.empty()


async def test_new_replica_starts_with_the_fleet_state(cluster_factory: ClusterFactory) -> None:
    """A replica that joins later reads the whole state before it serves."""
    a = await cluster_factory()
    await a.set_state("weights", "gpu0", 2.5)
    b = await cluster_factory()
    assert b.state("weights") == {"gpu0": 2.5}


async def test_missed_announcement_is_repaired(
    cluster_factory: ClusterFactory, redis_server: RedisServer
) -> None:
    """A change whose announcement never came is picked up by the periodic re-read."""
    b: Cluster = await cluster_factory(resync_s=0.3)
    heard: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
    b.on_state(lambda *change: heard.put_nowait(change))
    raw = Redis.from_url(redis_server.url)
    try:  # what a lost pub/sub message looks like: written and versioned, never announced
        await raw.hset("fleet:state:kind:max_concurrent", "gpu0", "8")
        await raw.sadd("fleet:state:kinds", "max_concurrent")
        await raw.incr("fleet:state:version")
    finally:
        await raw.aclose()
    assert await asyncio.wait_for(heard.get(), 1.0) == ("max_concurrent", "gpu0", 8)
    assert b.state("max_concurrent") == {"gpu0": 8}


async def test_fleets_sharing_a_redis_stay_apart(cluster_factory: ClusterFactory) -> None:
    """Two cluster names on one Redis share nothing: keys are prefixed with the name."""
    a = await cluster_factory(name="east")
    b = await cluster_factory(name="west")
    await a.set_state("strategy", "current", "score")
    assert await a.acquire("gpu0", 1) is not None
    assert await b.acquire("gpu0", 1) is not None
    await asyncio.sleep(0.2)
    assert b.state("strategy") == {}
    await until(lambda: a.in_flight("gpu0") == 1 and b.in_flight("gpu0") == 1, 1.0)


async def test_bad_kind_or_key_is_refused(cluster_factory: ClusterFactory) -> None:
    a = await cluster_factory()
    with pytest.raises(ValueError, match="kind"):
        await a.set_state("Bad Kind", "x", 1)
    with pytest.raises(ValueError, match="key"):
        await a.set_state("drains", "a\nb", 1)


async def test_a_redis_that_comes_back_empty_gets_the_state_back(
    cluster_factory: ClusterFactory, redis_server: RedisServer
) -> None:
    """Redis restarted without persistence (a pod restart) holds no state: the replicas do
    not read that as every registration, drain and owed operation deleted; they write their
    copy back, so a replica that joins afterwards starts with the fleet's state."""
    a = await cluster_factory(retry_s=0.1, resync_s=0.3)
    b = await cluster_factory(retry_s=0.1, resync_s=0.3)
    deleted: list[tuple[str, str]] = []
    for replica in (a, b):
        replica.on_state(lambda kind, key, value: value is None and deleted.append((kind, key)))
    record = {"id": "gpu9", "url": "http://127.0.0.1:9"}
    await a.set_state("backends", "gpu9", record)
    await a.set_state("drains", "gpu0", True)
    await until(lambda: b.state("drains") == {"gpu0": True}, 1.0)
    redis_server.stop()
    redis_server.start()  # empty: --save "" and no append-only file
    await until(lambda: all(r.link.episodes == 1 and r.up for r in (a, b)), 5.0)
    for replica in (a, b):
        assert replica.state("backends") == {"gpu9": record}
        assert replica.state("drains") == {"gpu0": True}
    assert deleted == []
    c = await cluster_factory()
    assert c.state("backends") == {"gpu9": record}
    assert c.state("drains") == {"gpu0": True}
    # A deletion is still a deletion afterwards.
    await c.set_state("drains", "gpu0", None)
    await until(lambda: a.state("drains") == {} and b.state("drains") == {}, 1.0)
