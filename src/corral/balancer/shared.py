"""Admission for a corral cluster: every local slot is also a unit of fleet-wide capacity.

Bound only when ``[cluster] redis_url`` is set (:class:`SharedAdmission` replaces
:class:`~corral.balancer.admission.Admission`), so a single corral's request path does no
extra work. The local queue, priorities and late binding stay as they are: a request first
gets a local grant (at once or from the queue), then takes a unit of that backend's
fleet-wide capacity: one this replica already holds (no I/O), else units from Redis for it and
the queue behind it (one round trip). When none is free fleet-wide the local grant is undone,
this replica announces that it wants units, and the request picks again (the fleet-wide count
it just heard marks that backend full) or waits, keeping its place in the queue. While
requests wait here on backends other replicas fill, the want is repeated every 100 ms, so the
others hand units over (corral.cluster.slots). A unit freed on another replica wakes this
replica's queue, after a few milliseconds' grace when some replica has a more urgent waiter
(corral.cluster.urgency).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from corral.balancer.admission import Admission, Lease, Waiter
from corral.balancer.routing import Router, backend_cap, demand_key
from corral.config import QueueSettings
from corral.errors import RoutingError
from corral.fleet.backends import BackendState, Clock
from corral.metrics import Metrics

if TYPE_CHECKING:
    from corral.cluster import Cluster, SlotLease

# A request denied this many fleet-wide slots in a row pauses briefly before it picks again
# (a stale count could otherwise make it pick the same full backend at once, again and again).
_DENIALS_BEFORE_PAUSE = 3
_PAUSE_S = 0.005
# While requests wait here, this replica repeats its want for the backends they could use and
# other replicas fill, this often (the others drop a want not repeated within 0.35 s).
_WANT_EVERY_S = 0.1
# The waiters looked at for that (the most deserving first).
_WANT_WAITERS = 16


class SharedLease(Lease):
    """A :class:`Lease` that also holds the fleet-wide slot; both given back on exit."""

    __slots__ = ("_slot",)

    async def __aenter__(self) -> SharedLease:
        model, model_key, route, exclude, rank, enqueued, session, num_ctx, cloud = self._ask
        admission = self._admission
        assert isinstance(admission, SharedAdmission)
        if cloud:
            self.backend = admission.remote(model, model_key, exclude)
            return self
        self.backend, self._slot = await admission.claim(
            model, model_key, route, exclude, rank, enqueued, session, num_ctx
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        admission = self._admission
        assert isinstance(admission, SharedAdmission)
        model_key, route, cloud = self._ask[1], self._ask[2], self._ask[8]
        if cloud:
            admission.remote_done(self.backend)
            return
        key = demand_key(model_key, route)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled (the client left, corral stops): no await here. Redis hears of it in
            # the background, and this replica's queue is woken once it has.
            admission.release_later(self._slot)
            admission.release(self.backend, key, self.served_s)
            return
        try:
            # Fleet-wide first: the local release wakes this replica's queue, whose claim
            # must find the slot free in Redis.
            if not admission.cluster.keep(self._slot):
                await admission.cluster.release(self._slot)
        finally:
            admission.release(self.backend, key, self.served_s)


class SharedAdmission(Admission):
    """Admission whose slots are leases shared with the other replicas of a cluster."""

    lease_type = SharedLease

    def __init__(
        self,
        router: Router,
        settings: QueueSettings,
        metrics: Metrics,
        cluster: Cluster,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(router, settings, metrics, clock=clock)
        self.cluster = cluster
        self._later: set[asyncio.Task[None]] = set()
        self._wake_at: asyncio.TimerHandle | None = None
        self._want_at: asyncio.TimerHandle | None = None
        self.denied = 0  # fleet-wide slots refused after a local grant (contention)
        cluster.on_count(self._counted)
        cluster.on_freed(self._freed)

    async def claim(
        self,
        model: str,
        model_key: str | None,
        route: str,
        exclude: Collection[str],
        rank: int,
        enqueued: float | None,
        session: str | None,
        num_ctx: int | None,
    ) -> tuple[BackendState, SlotLease]:
        """A local grant and the fleet-wide lease on the same backend. Raises as
        :meth:`Admission.acquire` (a queue timeout counts from the first try)."""
        if enqueued is None:
            enqueued = self._clock()
        denials = 0
        while True:
            backend = await self.acquire(
                model,
                model_key,
                route,
                exclude,
                rank=rank,
                enqueued=enqueued,
                session=session,
                num_ctx=num_ctx,
            )
            try:
                cap = backend_cap(backend)
                lease = self.cluster.reuse(backend.id, cap)
                if lease is None:
                    priority = rank + (self._clock() - enqueued) / self.settings.aging_s
                    lease = await self.cluster.acquire(
                        backend.id, cap, min(cap, 1 + self._count), priority
                    )
            except BaseException:
                self._undo(backend, model_key, route)
                raise
            if lease is not None:
                return backend, lease
            # Another replica took the last slot: its count, just heard, marks it full here.
            self.denied += 1
            self._undo(backend, model_key, route)
            denials += 1
            if denials >= _DENIALS_BEFORE_PAUSE:
                await asyncio.sleep(_PAUSE_S)

    def _undo(self, backend: BackendState, model_key: str | None, route: str) -> None:
        backend.total_requests -= 1
        self.release(backend, demand_key(model_key, route))

    def release_later(self, lease: SlotLease) -> None:
        """Give the fleet-wide slot back in the background, then wake the queue."""
        task = asyncio.get_running_loop().create_task(self._release(lease))
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _release(self, lease: SlotLease) -> None:
        await self.cluster.release(lease)
        self.registry.notify()

    # Hearing the fleet --------------------------------------------------------------------

    def _counted(self, backend_id: str, elsewhere: int) -> None:
        if backend_id in self.registry:
            backend = self.registry.get(backend_id)
            fewer = elsewhere < backend.elsewhere
            backend.elsewhere = elsewhere
            if fewer and self._count:
                # Slots opened up in this replica's view (another replica's units went
                # back or expired, or Redis went away and only local requests count now):
                # the queue may dispatch.
                self.registry.notify()

    def _freed(self, backend_id: str) -> None:
        """A slot freed on another replica: dispatch, after the grace another replica's more
        urgent waiter is owed."""
        best = self._best()
        if best is None:
            return
        delay = self.cluster.yield_s(best)
        if delay <= 0:
            self.registry.notify()
        elif self._wake_at is None:
            self._wake_at = asyncio.get_running_loop().call_later(delay, self._wake)

    def _wake(self) -> None:
        self._wake_at = None
        self.registry.notify()

    def _best(self) -> float | None:
        """The effective priority of the most urgent waiter here (None: nobody waits)."""
        if not self._count:
            return None
        now, aging = self._clock(), self.settings.aging_s
        return max(lst[0].effective(now, aging) for lst in self._classes if lst)

    def _add(self, waiter: Waiter) -> None:
        super()._add(waiter)
        self.cluster.publish_urgency(self._best())
        if self._want_at is None:
            self._want()

    def _want(self) -> None:
        """While requests wait: ask the other replicas for units of the backends they could
        use that other replicas fill; again every ``_WANT_EVERY_S``."""
        self._want_at = None
        best = self._best()
        if best is None:
            return
        now, aging = self._clock(), self.settings.aging_s
        waiters = sorted(
            (w for lst in self._classes for w in lst),
            key=lambda w: -w.effective(now, aging),
        )[:_WANT_WAITERS]
        wanted: set[str] = set()
        for waiter in waiters:
            try:
                backends = self.router.eligible(waiter.model_key, waiter.exclude)
            except RoutingError:
                continue
            for b in backends:
                if (
                    b.id not in wanted
                    and b.elsewhere > 0
                    and b.in_flight + b.elsewhere >= (backend_cap(b))
                ):
                    wanted.add(b.id)
                    self.cluster.want(b.id, waiter.effective(now, aging))
        self._want_at = asyncio.get_running_loop().call_later(_WANT_EVERY_S, self._want)

    def _discard(self, waiter: Waiter) -> bool:
        found = super()._discard(waiter)
        if found:
            self.cluster.publish_urgency(self._best())
        return found

    async def close_shared(self) -> None:
        """Finish the background releases (at stop)."""
        if self._want_at is not None:
            self._want_at.cancel()
            self._want_at = None
        if self._later:
            await asyncio.gather(*self._later, return_exceptions=True)


__all__ = ["SharedAdmission", "SharedLease"]
