"""The cluster: this replica's membership in a fleet of corrals that share one Redis.

:class:`Cluster` is the one object the rest of corral talks to. It owns the link to Redis, the
fleet-wide slots, the shared control state, the shared rate limits, the leader lock and the
urgency board, and one supervisor coroutine (:meth:`Cluster.run`) that keeps them connected:
subscribe to the fleet's channels, resynchronise, then listen, heartbeat, check the state
version and hold or seek leadership until Redis fails; then probe every ``retry_s`` and start
over. While Redis is away every call answers from the local view at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.asyncio.client import PubSub

from corral.cluster.control import ControlState, StateCallback
from corral.cluster.leader import Leadership
from corral.cluster.limits import SharedLimits
from corral.cluster.link import (
    REDIS_FAILURES,
    ClusterUnavailableError,
    Keys,
    RedisLink,
    decode,
    honour_cancel,
)
from corral.cluster.slots import FleetSlots, SlotLease
from corral.cluster.urgency import UrgencyBoard
from corral.config import ClusterSettings

log = structlog.get_logger("corral.cluster")


class Cluster:
    """Shared slots, state, limits and leadership for one replica of a corral fleet."""

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        registry: CollectorRegistry | None = None,
        timeout_s: float = 0.25,
        sync_timeout_s: float = 1.0,
        retry_s: float = 0.5,
        resync_s: float = 2.0,
        grace_s: float = 0.005,
        idle_s: float = 0.05,
        replica: str | None = None,
    ) -> None:
        if settings.redis_url is None or not settings.redis_url.get_secret_value():
            raise ValueError("cluster.redis_url is not set")
        self.name = settings.name
        self.lease_s = settings.lease_s
        self.replica = replica or uuid.uuid4().hex
        self.keys = Keys(settings.name)
        self._sync_timeout_s = sync_timeout_s
        self._retry_s = retry_s
        self._resync_s = resync_s
        self.link = RedisLink(
            settings.redis_url.get_secret_value(), timeout_s=timeout_s, on_down=self._lost
        )
        self.slots = FleetSlots(self.link, self.keys, self.replica, self.lease_s, idle_s=idle_s)
        self.control = ControlState(self.link, self.keys, self.replica)
        self.limits = SharedLimits(self.link, self.keys)
        self.leadership = Leadership(self.link, self.keys, self.replica, self.lease_s)
        self.urgency = UrgencyBoard(
            self.link,
            self.keys,
            self.replica,
            grace_s=grace_s,
            stale_s=max(self.lease_s, 2 * resync_s),
        )
        self.slots.best = lambda: self.urgency.mine
        self.slots.settled = self.urgency.settled
        self._watch: set[str] = set()
        self._pubsub: PubSub | None = None
        self._repair = asyncio.Event()
        self._runner: asyncio.Task[Any] | None = None
        if registry is not None:
            registry.register(ClusterCollector(self))

    # State of the membership ---------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Redis answers and this replica is synchronised with it."""
        return self.link.up

    @property
    def is_leader(self) -> bool:
        return self.leadership.is_leader

    def watch(self, backend_ids: Iterable[str]) -> None:
        """Keep the fleet-wide counts of these backends current (re-counted every heartbeat)
        even before this replica takes a slot on them."""
        self._watch = set(backend_ids)

    # Slots (see corral.cluster.slots) ------------------------------------------------------

    async def acquire(
        self, backend_id: str, limit: int, want: int = 1, priority: float | None = None
    ) -> SlotLease | None:
        """A fleet-wide slot on ``backend_id`` (None: ``limit`` are held fleet-wide): a unit
        this replica holds (no I/O), else up to ``want`` units from Redis (one round trip)."""
        return await self.slots.acquire(backend_id, limit, want, priority)

    def reuse(self, backend_id: str, limit: int) -> SlotLease | None:
        """A unit this replica holds free, with no await (None: call :meth:`acquire`)."""
        return self.slots.reuse(backend_id, limit)

    def keep(self, lease: SlotLease) -> bool:
        """Done with ``lease``, its unit kept here, with no await (False: call
        :meth:`release`, the unit goes back to Redis)."""
        return self.slots.keep(lease)

    def want(self, backend_id: str, priority: float | None) -> None:
        """Ask the other replicas for units of ``backend_id`` (rate-limited, no wait)."""
        self.slots.want(backend_id, priority)

    async def release(self, lease: SlotLease) -> None:
        await self.slots.release(lease)

    def release_nowait(self, lease: SlotLease) -> None:
        self.slots.release_nowait(lease)

    def in_flight(self, backend_id: str) -> int:
        """Fleet-wide units held on ``backend_id`` as last seen (no I/O)."""
        return self.slots.in_flight(backend_id)

    def elsewhere(self, backend_id: str) -> int:
        """Units other replicas hold on ``backend_id`` as last seen (0 while Redis is away)."""
        return self.slots.elsewhere(backend_id)

    def on_freed(self, callback: Callable[[str], None]) -> None:
        self.slots.on_freed(callback)

    def on_count(self, callback: Callable[[str, int], None]) -> None:
        """``callback(backend_id, elsewhere)`` on every fleet-wide count heard."""
        self.slots.on_count(callback)

    def publish_urgency(self, best: float | None) -> None:
        """This replica's most urgent waiter (effective priority), or None: nobody waits."""
        self.urgency.publish(best)

    def yield_s(self, mine: float) -> float:
        """Seconds to let a freed slot go to a more urgent replica before claiming it."""
        return self.urgency.yield_s(mine)

    # Control state, limits, leadership -----------------------------------------------------

    async def set_state(self, kind: str, key: str, value: Any) -> None:
        await self.control.set_state(kind, key, value)

    def state(self, kind: str) -> dict[str, Any]:
        return self.control.state(kind)

    def on_state(self, callback: StateCallback) -> None:
        self.control.on_state(callback)

    async def take(self, bucket: str, rate: float, burst: float) -> bool | None:
        return await self.limits.take(bucket, rate, burst)

    async def wait_s(self, bucket: str, rate: float, burst: float) -> float | None:
        return await self.limits.wait_s(bucket, rate, burst)

    def on_leadership(self, callback: Callable[[bool], None]) -> None:
        self.leadership.on_leadership(callback)

    # The supervisor ------------------------------------------------------------------------

    async def connect(self) -> bool:
        """Try once to join (bounded by a few ``sync_timeout_s``): True when up. :meth:`run`
        keeps trying when this fails."""
        if not self.link.up and self._pubsub is None:
            self._pubsub = await self._sync()
        return self.link.up

    async def run(self) -> None:
        """Stay joined: listen, heartbeat, repair, lead; when Redis fails, probe and resync."""
        self._runner = asyncio.current_task()
        while True:
            pubsub, self._pubsub = self._pubsub, None
            if pubsub is None:
                pubsub = await self._sync()
            if pubsub is None:
                await asyncio.sleep(self._retry_s)
                continue
            await self._serve(pubsub)

    async def _sync(self) -> PubSub | None:
        """Subscribe, write what changed here meanwhile, re-read the state, re-register this
        replica's leases, and mark the link up. None when Redis does not answer."""
        pubsub = self.link.redis.pubsub(ignore_subscribe_messages=True)
        bound = self._sync_timeout_s
        try:
            await self.link.run(self.link.redis.ping(), bound)
            k = self.keys
            channels = (k.freed, k.taken, k.state, k.waiting, k.wanted)
            await self.link.run(pubsub.subscribe(*channels), bound)
            await self.control.reload()
            await self.slots.tick(self._watch)
        except ClusterUnavailableError:
            await _close(pubsub)
            return None
        self.urgency.forget()
        self.link.recovered()
        return pubsub

    async def _serve(self, pubsub: PubSub) -> None:
        tasks = [
            asyncio.create_task(self._listen(pubsub), name="cluster-listen"),
            asyncio.create_task(self._heartbeat(), name="cluster-heartbeat"),
            asyncio.create_task(self._repair_state(), name="cluster-state"),
            asyncio.create_task(self.leadership.run(), name="cluster-leader"),
            asyncio.create_task(self.link.down.wait(), name="cluster-down"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None and not isinstance(error, ClusterUnavailableError):
                    log.error("cluster task failed", task=task.get_name(), error=repr(error))
                    self.link.fail(f"{task.get_name()} failed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close(pubsub)

    async def _listen(self, pubsub: PubSub) -> None:
        k = self.keys
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except REDIS_FAILURES as exc:
                honour_cancel()
                self.link.fail(exc)
                return
            honour_cancel()
            if message is None or message.get("type") != "message":
                continue
            channel, data = decode(message["channel"]), message["data"]
            if channel in (k.freed, k.taken):
                self.slots.heard(channel, data)
            elif channel == k.state:
                self.control.heard(data)
                if self.control.stale:
                    self._repair.set()
            elif channel == k.wanted:
                self.slots.heard_want(data)
            elif channel == k.waiting:
                self.urgency.heard(data)

    async def _heartbeat(self) -> None:
        """Every lease_s/3: extend this replica's units, re-count, re-announce its waiter."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self.slots.tick(self._watch)
            if self.urgency.mine is not None:
                await self.urgency.announce()

    async def _repair_state(self) -> None:
        """Every resync_s (or at once after a gap): re-read the state if its version moved."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._repair.wait(), self._resync_s)
            self._repair.clear()
            await self.control.check()

    def _lost(self) -> None:
        self.leadership.lost_redis()
        self.urgency.forget()
        self.slots.lost()

    async def close(self) -> None:
        """Leave: stop :meth:`run` if it still runs, give up leadership (another replica leads
        at once), give its units back, close the connections."""
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done() and runner is not asyncio.current_task():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await self.leadership.resign()
        await self.slots.close()
        if self._pubsub is not None:
            await _close(self._pubsub)
            self._pubsub = None
        await self.link.close()


async def _close(pubsub: PubSub) -> None:
    with contextlib.suppress(*REDIS_FAILURES, RuntimeError):
        async with asyncio.timeout(0.5):
            await pubsub.aclose()


class ClusterCollector:
    """``corral_cluster_up``, ``corral_cluster_leader`` and
    ``corral_cluster_down_episodes_total``, read at scrape time."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def describe(self) -> list[Metric]:
        return list(self._families(0, 0, 0))

    def collect(self) -> Iterator[Metric]:
        c = self._cluster
        return self._families(float(c.up), float(c.is_leader), c.link.episodes)

    @staticmethod
    def _families(up: float, leader: float, episodes: int) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "corral_cluster_up",
            "1 while this replica shares state through the cluster's Redis; 0: serving on "
            "its local view.",
            value=up,
        )
        yield GaugeMetricFamily(
            "corral_cluster_leader",
            "1 while this replica holds the leader lock (runs placement).",
            value=leader,
        )
        yield CounterMetricFamily(
            "corral_cluster_down_episodes",
            "Times this replica lost the cluster's Redis after having reached it.",
            value=episodes,
        )
