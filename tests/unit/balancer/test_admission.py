"""The central priority queue: late binding, priorities, aging, cancellation, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from corral.balancer.admission import Admission, parse_priority
from corral.balancer.routing import Router
from corral.config import BalancerSettings, QueueSettings
from corral.errors import ModelNotFoundError, NoBackendError
from corral.fleet.backends import BackendRegistry, BackendState
from corral.metrics import Metrics
from tests.helpers import FakeClock

LOW, NORMAL, HIGH, URGENT = 0, 1, 2, 3


def setup(
    slots: int = 1, backends: int = 1, clock: FakeClock | None = None, **queue: float
) -> tuple[Admission, list[BackendState]]:
    bs = []
    for i in range(backends):
        b = BackendState(id=f"b{i}", url=f"http://127.0.0.1:{i + 1}", max_concurrent=slots)
        b.healthy = b.probed = True
        b.models = {"m:latest"}
        bs.append(b)
    clock = clock or FakeClock(100.0)
    registry = BackendRegistry(bs, clock=clock)
    router = Router(registry, BalancerSettings(strategy="least_connections"), clock=clock)
    settings = QueueSettings(**{"max_size": 100, "timeout_s": 60, **queue})  # type: ignore[arg-type]
    return Admission(router, settings, Metrics(), clock=clock), bs


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_parse_priority() -> None:
    """X-Priority names map to ranks; absent is normal; anything else is a clear error."""
    assert parse_priority(None) == NORMAL
    assert parse_priority("URGENT") == URGENT
    assert parse_priority(" low ") == LOW
    with pytest.raises(ValueError, match="expected low, normal, high or urgent"):
        parse_priority("asap")


async def test_free_slot_is_reserved_without_queueing() -> None:
    """With a free slot the request gets it at once, already counted in flight."""
    adm, (b,) = setup(slots=2)
    assert await adm.acquire("m", "m:latest", "x") is b
    assert b.in_flight == 1
    assert adm.queued == 0


async def test_never_more_than_the_slots() -> None:
    """2 backends x 2 slots, 20 requests: at most 2 in flight per backend; all get served."""
    adm, bs = setup(slots=2, backends=2)
    peak = {b.id: 0 for b in bs}

    async def one() -> None:
        b = await adm.acquire("m", "m:latest", "x")
        peak[b.id] = max(peak[b.id], b.in_flight)
        assert b.in_flight <= 2
        await asyncio.sleep(0.001)
        adm.release(b, "m:latest")

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), 5)
    assert peak == {"b0": 2, "b1": 2}
    assert all(b.in_flight == 0 for b in bs)
    assert sum(b.total_requests for b in bs) == 20


async def test_urgent_overtakes_normal_and_fifo_within_a_class() -> None:
    """Queued urgent requests go first; within one class, first come first served."""
    adm, (_b,) = setup(slots=1)
    held = await adm.acquire("m", "m:latest", "x")
    order: list[str] = []

    async def one(name: str, rank: int) -> None:
        got = await adm.acquire("m", "m:latest", "x", rank=rank)
        order.append(name)
        adm.release(got, "m:latest")

    tasks = []
    for name, rank in [("n1", NORMAL), ("n2", NORMAL), ("l1", LOW), ("u1", URGENT), ("h1", HIGH)]:
        tasks.append(asyncio.create_task(one(name, rank)))
        await settle()
    assert adm.queued == 5
    adm.release(held, "m:latest")
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["u1", "h1", "n1", "n2", "l1"]


async def test_low_is_served_within_its_aging_bound() -> None:
    """Under a steady stream of high requests a low one is served once aged past them."""
    clock = FakeClock(100.0)
    adm, (_b,) = setup(slots=1, clock=clock, aging_s=10)
    held = await adm.acquire("m", "m:latest", "x")
    low = asyncio.create_task(adm.acquire("m", "m:latest", "x", rank=LOW))
    await settle()
    served_low_at = None
    for step in range(40):
        # A fresh high request arrives every second; one slot turns over every second.
        high = asyncio.create_task(adm.acquire("m", "m:latest", "x", rank=HIGH))
        await settle()
        clock.now += 1
        adm.release(held, "m:latest")
        await settle()
        if low.done():
            served_low_at = step
            held = low.result()
            high.cancel()
            break
        held = await high
    assert served_low_at is not None
    # Two classes apart with aging_s=10: the low request wins after about 20 s.
    assert 15 <= served_low_at <= 22


async def test_cancelled_waiter_leaves_the_queue_at_once() -> None:
    """A queued client that disconnects is removed at once and its slot is not leaked."""
    adm, (b,) = setup(slots=1)
    held = await adm.acquire("m", "m:latest", "x")
    waiting = asyncio.create_task(adm.acquire("m", "m:latest", "x"))
    await settle()
    assert adm.queued == 1
    waiting.cancel()
    await settle()
    assert adm.queued == 0
    adm.release(held, "m:latest")
    assert b.in_flight == 0


async def test_queue_full_timeout_and_close_are_503() -> None:
    """Past max_size, past timeout_s, or when shutting down: NoBackendError with Retry-After."""
    clock = FakeClock(100.0)
    adm, (_b,) = setup(slots=1, clock=clock, max_size=1, timeout_s=0.05)
    await adm.acquire("m", "m:latest", "x")
    first = asyncio.create_task(adm.acquire("m", "m:latest", "x"))
    await settle()
    with pytest.raises(NoBackendError, match="queue is full") as info:
        await adm.acquire("m", "m:latest", "x")
    assert info.value.retry_after_s >= 1
    with pytest.raises(NoBackendError, match="waited"):
        await first
    closing = asyncio.create_task(adm.acquire("m", "m:latest", "x"))
    await settle()
    assert adm.close("corral is shutting down") == 1
    with pytest.raises(NoBackendError, match="shutting down"):
        await closing
    with pytest.raises(NoBackendError, match="shutting down"):
        await adm.acquire("m", "m:latest", "x")
    rejections = adm.metrics.rejections
    for reason in ("queue_full", "queue_timeout", "draining"):
        assert rejections.labels(reason=reason)._value.get() >= 1


async def test_waiter_for_another_model_does_not_block() -> None:
    """A request queued for a busy model does not hold back one whose backend is free."""
    adm, (_b0, b1) = setup(slots=1, backends=2)
    b1.models = {"other:latest"}
    await adm.acquire("m", "m:latest", "x")
    blocked = asyncio.create_task(adm.acquire("m", "m:latest", "x"))
    await settle()
    got = await asyncio.wait_for(adm.acquire("other", "other:latest", "x"), 1)
    assert got is b1
    assert not blocked.done()
    blocked.cancel()


async def test_a_retry_keeps_its_place_one_class_up() -> None:
    """A retried normal request (enqueued long ago, now high) goes before queued highs."""
    clock = FakeClock(100.0)
    adm, (_b,) = setup(slots=1, clock=clock, aging_s=1000)
    held = await adm.acquire("m", "m:latest", "x")
    order: list[str] = []

    async def one(name: str, rank: int, enqueued: float | None = None) -> None:
        got = await adm.acquire("m", "m:latest", "x", rank=rank, enqueued=enqueued)
        order.append(name)
        adm.release(got, "m:latest")

    first_seen = clock.now
    clock.now += 5
    tasks = [asyncio.create_task(one("h1", HIGH)), asyncio.create_task(one("h2", HIGH))]
    await settle()
    tasks.append(asyncio.create_task(one("retry", HIGH, enqueued=first_seen)))
    await settle()
    adm.release(held, "m:latest")
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["retry", "h1", "h2"]
    assert adm.queued_by_priority() == {"low": 0, "normal": 0, "high": 0, "urgent": 0}


async def test_a_model_being_pulled_waits_for_its_pull() -> None:
    """A fleet-wide pull is bringing a model: a request for it waits in the queue (not
    Ollama's 404) and is served the moment a backend lists it."""
    adm, (b,) = setup(slots=1)
    registry = adm.registry
    with registry.bringing(["new:latest"]):
        waiting = asyncio.create_task(adm.acquire("new", "new:latest", "chat"))
        await settle()
        assert not waiting.done()
        assert adm.queued == 1
        b.models.add("new:latest")
        registry.refresh_models()
        registry.notify()
        assert await asyncio.wait_for(waiting, 1) is b


async def test_a_pull_that_brings_nothing_ends_its_waiters_with_404() -> None:
    """The pull failed everywhere: whoever waited for its model gets the 404 at once, and a
    request behind a full queue for a model being pulled waits rather than gets it."""
    adm, (b,) = setup(slots=1)
    held = await adm.acquire("m", "m:latest", "chat")  # the queue is busy from here on
    queued_for_m = asyncio.create_task(adm.acquire("m", "m:latest", "chat"))
    with adm.registry.bringing(["new:latest"]):
        waiting = asyncio.create_task(adm.acquire("new", "new:latest", "chat"))
        await settle()
        assert not waiting.done()
        adm.release(held, "m:latest")  # a slot frees: m is served, new still waits
        assert await asyncio.wait_for(queued_for_m, 1) is b
        assert not waiting.done()
    with pytest.raises(ModelNotFoundError):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(ModelNotFoundError):
        await adm.acquire("other", "other:latest", "chat")  # not pulled: 404 at once
