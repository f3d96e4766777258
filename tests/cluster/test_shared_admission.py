"""SharedAdmission: two replicas in one process, each its own Cluster, registry and queue over
the same backends, sharing a real redis-server: the fleet-wide cap, waiters woken across
replicas, idle units handed over, the most urgent waiter first, cancellation, Redis down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from corral.balancer.admission import PRIORITIES
from corral.balancer.routing import Router
from corral.balancer.shared import SharedAdmission
from corral.cluster import Cluster
from corral.config import BalancerSettings, QueueSettings
from corral.fleet.backends import BackendRegistry, BackendState
from corral.metrics import Metrics
from tests.cluster.conftest import ClusterFactory, RedisServer
from tests.helpers import until

pytestmark = pytest.mark.cluster

MODEL, KEY = "m", "m:latest"
NORMAL, URGENT = PRIORITIES["normal"], PRIORITIES["urgent"]
PROMPT_S = 0.5  # "at once" on a busy machine: far below the queue's timeout and idle units' 30 s


class Replica:
    """One corral replica's admission: its own Cluster, registry, router and queue."""

    def __init__(self, cluster: Cluster, backends: list[BackendState]) -> None:
        self.cluster = cluster
        self.registry = BackendRegistry(backends)
        self.metrics = Metrics()
        router = Router(
            self.registry, BalancerSettings(strategy="least_connections", model_affinity=False)
        )
        queue = QueueSettings(max_size=100, timeout_s=10)
        self.admission = SharedAdmission(router, queue, self.metrics, cluster)
        cluster.watch(self.registry.ids())
        self.requests: list[Request] = []

    def backend(self, backend_id: str = "gpu0") -> BackendState:
        return self.registry.get(backend_id)

    def queue_depth(self) -> float:
        return sum(
            self.metrics.registry.get_sample_value("corral_queue_depth", {"priority": p}) or 0
            for p in PRIORITIES
        )


class Request:
    """A request on ``replica``: takes a slot, records where, and holds it until finished."""

    def __init__(
        self, replica: Replica, rank: int = NORMAL, entered: list[Request] | None = None
    ) -> None:
        self.replica = replica
        self.rank = rank
        self.backend: str | None = None
        self.started = time.monotonic()
        self.waited_s: float | None = None
        self.admitted = asyncio.Event()
        self._finish = asyncio.Event()
        self._log = entered
        self.task = asyncio.create_task(self._run())
        replica.requests.append(self)

    async def _run(self) -> None:
        async with self.replica.admission.slot(MODEL, KEY, "generate", rank=self.rank) as lease:
            self.backend = lease.backend.id
            self.waited_s = time.monotonic() - self.started
            if self._log is not None:
                self._log.append(self)
            self.admitted.set()
            await self._finish.wait()
            lease.served_s = 0.01

    async def admitted_within(self, timeout_s: float = PROMPT_S) -> None:
        await asyncio.wait_for(self.admitted.wait(), timeout_s)

    async def finish(self) -> None:
        self._finish.set()
        await self.task


def gpu(backend_id: str = "gpu0", slots: int = 1) -> BackendState:
    # One model at a time: the fleet-wide cap is max_concurrent (README "More than one corral").
    b = BackendState(
        id=backend_id, url="http://127.0.0.1:9", max_concurrent=slots, max_loaded_models=1
    )
    b.healthy = b.probed = True
    b.models = {KEY}
    return b


ReplicaFactory = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def replica(cluster_factory: ClusterFactory) -> AsyncIterator[ReplicaFactory]:
    """``await replica(slots=N, backends=[...], **Cluster options)``; at the end every request
    still running is cancelled and the background releases finish, before the clusters stop."""
    made: list[Replica] = []

    async def start(slots: int = 1, backends: list[str] | None = None, **options: Any) -> Replica:
        cluster = await cluster_factory(**options)
        r = Replica(cluster, [gpu(b, slots) for b in backends or ["gpu0"]])
        made.append(r)
        return r

    yield start
    tasks = [request.task for r in made for request in r.requests]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for r in made:
        await r.admission.close_shared()


async def test_the_cap_holds_across_both_replicas(replica: ReplicaFactory) -> None:
    """80 requests spread over two replicas on a backend of 3 slots: never more than 3 hold a
    slot at once on both together, 3 do at times, and every request is served."""
    a, b = await replica(slots=3), await replica(slots=3)
    holding = peak = served = 0

    async def one(r: Replica, i: int) -> None:
        nonlocal holding, peak, served
        async with r.admission.slot(MODEL, KEY, "generate"):
            holding += 1
            peak = max(peak, holding)
            assert holding <= 3
            for _ in range(i % 4):  # hold the slot over a few turns of the loop
                await asyncio.sleep(0.001)
            holding -= 1
        served += 1

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one((a, b)[i % 2], i) for i in range(80))), 10)
    assert served == 80
    assert peak == 3  # contended: the cap was reached, never passed
    assert time.monotonic() - started < 5
    for r in (a, b):
        assert r.backend().in_flight == 0
        assert r.admission.queued == 0
    await until(lambda: a.cluster.in_flight("gpu0") == 0 and b.cluster.in_flight("gpu0") == 0)


async def test_a_slot_freed_on_one_replica_admits_a_waiter_on_the_other(
    replica: ReplicaFactory,
) -> None:
    """B's request waits while A's holds the only slot; A's request ends: B's is admitted
    at once."""
    a, b = await replica(), await replica()
    held = Request(a)
    await held.admitted_within()
    await until(lambda: b.backend().elsewhere == 1)
    waiting = Request(b)
    await until(lambda: b.admission.queued == 1)
    assert not waiting.admitted.is_set()
    released = time.monotonic()
    await held.finish()
    await waiting.admitted_within()
    assert time.monotonic() - released < PROMPT_S
    assert waiting.backend == "gpu0"
    await waiting.finish()


async def test_idle_units_are_handed_to_the_replica_that_wants_them(
    replica: ReplicaFactory,
) -> None:
    """A holds both units of a backend idle (kept 30 s without demand); B's two requests get
    them at once, not after A's idle timer."""
    a = await replica(slots=2, idle_s=30.0)
    b = await replica(slots=2)
    first = [Request(a), Request(a)]
    for r in first:
        await r.admitted_within()
    for r in first:
        await r.finish()
    assert a.backend().in_flight == 0
    await until(lambda: b.backend().elsewhere == 2)  # A's idle units: the backend is full
    wanting = [Request(b), Request(b)]
    for r in wanting:
        await r.admitted_within()
        assert r.waited_s is not None
        assert r.waited_s < PROMPT_S
    await until(lambda: a.backend().elsewhere == 2)  # A's routing sees them at B now
    for r in wanting:
        await r.finish()


async def test_a_more_urgent_waiter_on_another_replica_wins_the_freed_unit(
    replica: ReplicaFactory,
) -> None:
    """A's request holds the only slot and a normal one waits behind it on A; an urgent one
    waits on B. When A's request ends, B's urgent request gets the unit, though A's waiter was
    first and the unit was A's; A's waiter follows."""
    a, b = await replica(), await replica()
    order: list[Request] = []
    held = Request(a)
    await held.admitted_within()
    await until(lambda: b.backend().elsewhere == 1)
    normal = Request(a, NORMAL, order)
    await until(lambda: a.admission.queued == 1)
    urgent = Request(b, URGENT, order)
    await until(lambda: b.admission.queued == 1)
    # A has heard B's want and its urgency (announced in the background).
    await until(lambda: bool(a.cluster.slots._live_wants("gpu0")))
    await until(lambda: (a.cluster.urgency.best_elsewhere() or 0) >= URGENT)
    await held.finish()
    await urgent.admitted_within()
    assert order == [urgent]
    assert not normal.admitted.is_set()
    await urgent.finish()
    await normal.admitted_within()
    assert order == [urgent, normal]
    await normal.finish()


async def test_cancelled_requests_leak_nothing(replica: ReplicaFactory) -> None:
    """Requests cancelled while they wait on B, and a holder cancelled on A (clients that
    left), give everything back: no queue entry, no slot here or fleet-wide; the next requests
    on both replicas are served at once, up to the cap."""
    a, b = await replica(slots=2), await replica(slots=2)
    holders = [Request(a), Request(a)]
    for r in holders:
        await r.admitted_within()
    await until(lambda: b.backend().elsewhere == 2)
    waiters = [Request(b, rank) for rank in (NORMAL, URGENT, NORMAL, URGENT, NORMAL)]
    await until(lambda: b.admission.queued == 5)
    for r in waiters[:4]:
        r.task.cancel()
    holders[0].task.cancel()  # its unit goes back in the background
    await asyncio.gather(*(r.task for r in [*waiters[:4], holders[0]]), return_exceptions=True)
    assert all(r.task.cancelled() for r in [*waiters[:4], holders[0]])
    await waiters[4].admitted_within()  # the one left is served with the unit freed
    assert b.admission.queued == 0
    assert b.queue_depth() == 0
    await holders[1].finish()
    await waiters[4].finish()
    for r in (a, b):
        assert r.backend().in_flight == 0
    # Fleet-wide, every unit is back in Redis (the idle ones within idle_s).
    await until(lambda: a.cluster.in_flight("gpu0") == 0 and b.cluster.in_flight("gpu0") == 0)
    await until(lambda: a.backend().elsewhere == 0 and b.backend().elsewhere == 0)
    both = [Request(a), Request(b)]
    for r in both:
        await r.admitted_within()
    for r in both:
        await r.finish()


async def test_redis_stopped_admission_counts_locally(
    replica: ReplicaFactory, redis_server: RedisServer
) -> None:
    """Redis stops while A's requests fill the backend: once the replicas see it gone, B no
    longer counts A's requests and serves two of its own at once; each replica's own requests
    still never pass the cap, and a slot freed locally admits the next one."""
    a, b = await replica(slots=2), await replica(slots=2)
    holders = [Request(a), Request(a)]
    for r in holders:
        await r.admitted_within()
    await until(lambda: b.backend().elsewhere == 2)

    redis_server.stop()
    await until(lambda: not a.cluster.up and not b.cluster.up, PROMPT_S + 1)
    assert a.backend().elsewhere == b.backend().elsewhere == 0
    on_b = [Request(b), Request(b)]
    for r in on_b:
        await r.admitted_within()
    third = Request(b)  # B's own two hold the backend: this one waits
    extra = Request(a)  # as does A's: its own two hold it
    await until(lambda: b.admission.queued == 1 and a.admission.queued == 1)
    assert not third.admitted.is_set()
    assert not extra.admitted.is_set()
    await on_b[0].finish()
    await third.admitted_within()
    await holders[0].finish()
    await extra.admitted_within()
    assert a.backend().in_flight == b.backend().in_flight == 2
    for r in (on_b[1], third, holders[1], extra):
        await r.finish()


async def test_redis_stopped_admits_the_requests_waiting_for_other_replicas_units(
    replica: ReplicaFactory, redis_server: RedisServer
) -> None:
    """Requests queued on B behind A's units when Redis stops are served on B's local view
    (where all its slots are free) at once, not left to time out in the queue."""
    a, b = await replica(slots=2), await replica(slots=2)
    holders = [Request(a), Request(a)]
    for r in holders:
        await r.admitted_within()
    await until(lambda: b.backend().elsewhere == 2)
    waiting = [Request(b), Request(b)]
    await until(lambda: b.admission.queued == 2)
    assert b.backend().in_flight == 0  # B's own requests: none on the backend

    redis_server.stop()
    await until(lambda: not b.cluster.up, PROMPT_S + 1)
    for r in waiting:
        await r.admitted_within()


async def test_routing_weighs_the_other_replicas_units(replica: ReplicaFactory) -> None:
    """A's two requests on gpu0 count on B: B's least-connections routing sends its next two
    to gpu1; once A's units go back (idle), B sees gpu0 empty again."""
    a = await replica(slots=4, backends=["gpu0"])
    b = await replica(slots=4, backends=["gpu0", "gpu1"])
    on_a = [Request(a), Request(a)]
    for r in on_a:
        await r.admitted_within()
    await until(lambda: b.backend("gpu0").elsewhere == 2)
    assert b.backend("gpu0").in_flight == 0
    on_b = [Request(b), Request(b)]
    for r in on_b:
        await r.admitted_within()
    assert [r.backend for r in on_b] == ["gpu1", "gpu1"]
    assert a.backend("gpu0").elsewhere == 0  # B's units are on gpu1, which A does not route
    for r in on_a:
        await r.finish()
    await until(lambda: b.backend("gpu0").elsewhere == 0, 1.0)
    for r in on_b:
        await r.finish()
