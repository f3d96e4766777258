"""Fleet-wide slots: leases in Redis shared by every replica, expired when a replica dies."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from corral.cluster import Cluster, SlotLease
from tests.cluster.conftest import LEASE_S, ClusterFactory
from tests.helpers import until

pytestmark = pytest.mark.cluster


async def test_never_more_than_limit_across_replicas(cluster_factory: ClusterFactory) -> None:
    """Three replicas hammering one backend never hold more than its limit at once."""
    replicas = [await cluster_factory() for _ in range(3)]
    limit, holding, peak, served = 3, 0, 0, 0

    async def client(cluster: Cluster) -> None:
        nonlocal holding, peak, served
        for _ in range(5):
            lease = None
            while lease is None:
                lease = await cluster.acquire("gpu0", limit)
                if lease is None:
                    await asyncio.sleep(0.001)  # back off; the slot is someone else's
            holding += 1
            peak = max(peak, holding)
            assert holding <= limit
            for _ in range(random.randint(0, 3)):
                await asyncio.sleep(0)
            holding -= 1
            await cluster.release(lease)
            served += 1

    await asyncio.wait_for(
        asyncio.gather(*(client(replicas[i % 3]) for i in range(60))), timeout=15
    )
    assert served == 300
    assert peak == limit  # contended: the limit was reached, never passed
    await until(lambda: all(r.in_flight("gpu0") == 0 for r in replicas), 1.0)


async def test_in_flight_is_fleet_wide(cluster_factory: ClusterFactory) -> None:
    """Leases taken on one replica show in another's in-flight count within a second, and
    the count hook tells it how many are held elsewhere."""
    a, b = await cluster_factory(), await cluster_factory()
    counts: dict[str, int] = {}
    b.on_count(counts.__setitem__)
    leases = [await a.acquire("gpu0", 4) for _ in range(3)]
    assert a.in_flight("gpu0") == 3
    assert a.elsewhere("gpu0") == 0
    await until(lambda: b.in_flight("gpu0") == 3, 1.0)
    assert b.elsewhere("gpu0") == 3
    await until(lambda: counts.get("gpu0") == 3, 1.0)
    own = await b.acquire("gpu0", 4)
    assert own is not None
    assert b.in_flight("gpu0") == 4
    assert b.elsewhere("gpu0") == 3
    for lease in leases:
        assert lease is not None
        await a.release(lease)
    await until(lambda: b.in_flight("gpu0") == 1, 1.0)
    assert counts["gpu0"] == 0


async def test_full_fleet_wide_refuses(cluster_factory: ClusterFactory) -> None:
    """A backend full because of another replica's leases refuses here too."""
    a, b = await cluster_factory(), await cluster_factory()
    assert await a.acquire("gpu0", 2) is not None
    assert await b.acquire("gpu0", 2) is not None
    assert await a.acquire("gpu0", 2) is None
    assert await b.acquire("gpu0", 2) is None
    assert await b.acquire("gpu1", 2) is not None  # another backend, its own slots


async def commands(cluster: Cluster) -> int:
    """Commands Redis has run (``INFO commandstats``, scripts' inner commands included),
    less the INFO asking."""
    stats = await cluster.link.redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def test_steady_stream_costs_almost_no_redis_work(cluster_factory: ClusterFactory) -> None:
    """A steady stream of requests on one replica reuses the units it holds: after the first
    grants, a request costs no Redis command at all (heartbeats aside)."""
    a = await cluster_factory()
    pairs = 0

    async def client() -> None:
        nonlocal pairs
        for _ in range(250):
            lease = await a.acquire("gpu0", 8)
            assert lease is not None
            await asyncio.sleep(0)
            await a.release(lease)
            pairs += 1

    await asyncio.gather(*(client() for _ in range(8)))  # warm: units granted
    before, calls = await commands(a), a.link.calls
    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(8)))
    elapsed = time.monotonic() - started
    used, round_trips = await commands(a) - before - 1, a.link.calls - calls - 1
    assert pairs == 4000
    heartbeats = 2 + elapsed / (LEASE_S / 3)  # each a script and a few commands inside it
    assert round_trips <= heartbeats, round_trips
    assert used <= 10 * heartbeats, used
    assert used / 2000 < 0.05


async def test_units_move_to_the_replica_that_needs_them(
    cluster_factory: ClusterFactory,
) -> None:
    """Units one replica holds idle go to another that asks for them at once (not after
    the idle timer); under contention the wanting replica gets its share while the holder
    keeps serving."""
    a = await cluster_factory(idle_s=30.0)  # idle units would stay with a for 30 s
    b = await cluster_factory(idle_s=30.0)
    leases = [await a.acquire("gpu0", 4) for _ in range(4)]
    for lease in leases:
        assert lease is not None
        await a.release(lease)
    assert a.slots.held("gpu0") == 4  # idle, still a's
    freed: asyncio.Queue[str] = asyncio.Queue()
    b.on_freed(freed.put_nowait)
    started = time.monotonic()
    assert await b.acquire("gpu0", 4) is None  # denied: b announces it wants units
    assert await asyncio.wait_for(freed.get(), 1.0) == "gpu0"
    got = await b.acquire("gpu0", 4)
    assert got is not None
    assert time.monotonic() - started < 0.5
    await until(lambda: a.slots.held("gpu0") == 0, 1.0)

    # Contention: a's requests keep every unit busy; b keeps asking and gets a share.
    await b.release(got)
    stop = time.monotonic() + 1.5
    served = {"a": 0, "b": 0}
    holding = 0

    async def client(cluster: Cluster, name: str) -> None:
        nonlocal holding
        while time.monotonic() < stop:
            lease = await cluster.acquire("gpu0", 4, want=2, priority=1.0)
            if lease is None:
                await asyncio.sleep(0.005)
                continue
            holding += 1
            assert holding <= 4
            await asyncio.sleep(0.005)
            holding -= 1
            await cluster.release(lease)
            served[name] += 1

    a.publish_urgency(1.0)
    b.publish_urgency(1.0)
    await asyncio.gather(*(client(a, "a") for _ in range(6)), *(client(b, "b") for _ in range(6)))
    assert served["a"] > 20
    assert served["b"] > 20, served


async def test_freed_slot_wakes_waiters_on_another_replica(
    cluster_factory: ClusterFactory,
) -> None:
    """A slot freed on one replica wakes the other's waiters, which then get it."""
    a, b = await cluster_factory(), await cluster_factory()
    lease = await a.acquire("gpu0", 1)
    assert lease is not None
    assert await b.acquire("gpu0", 1) is None
    freed: asyncio.Queue[str] = asyncio.Queue()
    b.on_freed(freed.put_nowait)
    started = time.monotonic()
    await a.release(lease)
    assert await asyncio.wait_for(freed.get(), 1.0) == "gpu0"
    assert time.monotonic() - started < 0.5
    assert await b.acquire("gpu0", 1) is not None


async def test_killed_replica_leases_free_within_lease_s(
    cluster_factory: ClusterFactory, replica_process: Any
) -> None:
    """SIGKILL a replica holding every slot: its slots free within lease_s, and the waiters
    of the other replicas are woken."""
    b, c = await cluster_factory(), await cluster_factory()
    b.watch(["gpu0"])
    holder = await replica_process("leases", "gpu0", "2")
    await holder.ready()
    assert await c.acquire("gpu0", 2) is None
    await asyncio.sleep(LEASE_S)  # its heartbeat keeps the leases past one lease_s
    assert await c.acquire("gpu0", 2) is None
    freed: asyncio.Queue[str] = asyncio.Queue()
    b.on_freed(freed.put_nowait)
    await holder.kill()
    killed = time.monotonic()
    lease: SlotLease | None = None
    while lease is None:
        assert time.monotonic() - killed < LEASE_S + 0.3, "leases outlived their replica"
        lease = await c.acquire("gpu0", 2)
        await asyncio.sleep(0.02)
    # b takes no slot itself: it hears of the freed capacity (c's answers, or its recount).
    assert await asyncio.wait_for(freed.get(), LEASE_S) == "gpu0"
    assert time.monotonic() - killed < LEASE_S + LEASE_S / 3 + 0.3


async def test_most_urgent_waiter_wins_the_freed_slot(cluster_factory: ClusterFactory) -> None:
    """With the urgency board, the replica whose waiter is most urgent gets a slot freed
    elsewhere, every time, though all replicas race for it."""
    holder = await cluster_factory()
    urgent = await cluster_factory(grace_s=0.02)
    low = await cluster_factory(grace_s=0.02)
    urgent.publish_urgency(3.0)
    low.publish_urgency(0.0)
    await until(lambda: low.urgency.best_elsewhere() == 3.0, 1.0)
    wins: list[str] = []
    armed = False
    claims: list[asyncio.Task[None]] = []
    got: asyncio.Queue[tuple[Cluster, SlotLease]] = asyncio.Queue()

    def claimer(cluster: Cluster, name: str, mine: float) -> None:
        """What the wired queue does on a freed slot: yield if outranked, then claim."""

        async def claim(backend_id: str) -> None:
            await asyncio.sleep(cluster.yield_s(mine))
            if armed and (lease := await cluster.acquire(backend_id, 1)) is not None:
                wins.append(name)
                await got.put((cluster, lease))

        cluster.on_freed(lambda backend_id: claims.append(asyncio.create_task(claim(backend_id))))

    claimer(urgent, "urgent", 3.0)
    claimer(low, "low", 0.0)
    for _ in range(10):
        lease = await holder.acquire("gpu0", 1)
        assert lease is not None
        armed = True
        await holder.release(lease)
        winner, won = await asyncio.wait_for(got.get(), 1.0)
        armed = False
        await asyncio.gather(*claims)  # the loser's claim found the slot taken
        claims.clear()
        await winner.release(won)
        # Idle: back to Redis, and the holder hears of it.
        await until(lambda: holder.in_flight("gpu0") == 0, 1.0)
        await asyncio.gather(*claims)  # woken again, but disarmed
        claims.clear()
    assert wins == ["urgent"] * 10


async def test_busy_units_go_to_the_more_urgent_replica(cluster_factory: ClusterFactory) -> None:
    """A replica whose requests hold every unit hands the next one that frees to a replica
    whose waiter is more urgent than its own; it keeps them from a less urgent one."""
    a = await cluster_factory(idle_s=30.0)
    b = await cluster_factory(idle_s=30.0)
    leases = [await a.acquire("gpu0", 2) for _ in range(2)]
    assert all(leases)
    a.publish_urgency(0.0)  # a's own queue: a low request waits
    b.publish_urgency(3.0)  # b's: an urgent one
    assert await b.acquire("gpu0", 2) is None  # denied: b wants units, as urgent
    await until(lambda: a.slots.elsewhere("gpu0") == 0 and bool(a.slots._live_wants("gpu0")), 1)
    lease = leases.pop()
    assert lease is not None
    await a.release(lease)  # goes to Redis, not to a's low waiter
    assert a.slots.held("gpu0") == 1
    assert await a.acquire("gpu0", 2, priority=0.0) is None  # nor back to a from Redis
    await until(lambda: b.in_flight("gpu0") == 1, 1.0)
    got = await b.acquire("gpu0", 2)
    assert got is not None

    # b's own waiter is the urgent one now: it keeps its unit from a's low one.
    a.publish_urgency(0.0)
    b.publish_urgency(3.0)
    assert await a.acquire("gpu0", 2, priority=0.0) is None
    await until(lambda: bool(b.slots._live_wants("gpu0")), 1.0)
    await b.release(got)
    assert b.slots.held("gpu0") == 1
