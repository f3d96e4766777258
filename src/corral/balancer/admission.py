"""Admission: slots per backend and a central priority queue with late binding.

A request that finds a free slot goes straight through. Otherwise it waits here, not in some
backend's own queue: the moment any eligible slot frees, the most deserving waiter (priority
class plus aging, FIFO within a class) gets whichever backend the strategy then picks. The
slot is reserved for it before it wakes, so no other request can take it in between.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from corral.balancer.routing import Router, backend_cap, demand_key
from corral.config import QueueSettings
from corral.errors import ModelNotFoundError, NoBackendError, RoutingError
from corral.fleet.backends import BackendState, Clock
from corral.metrics import Metrics

PRIORITIES: dict[str, int] = {"low": 0, "normal": 1, "high": 2, "urgent": 3}
PRIORITY_NAMES = {rank: name for name, rank in PRIORITIES.items()}


def parse_priority(value: str | None) -> int:
    """The rank of an ``X-Priority`` value (default normal); ValueError when unknown."""
    if value is None or not value.strip():
        return PRIORITIES["normal"]
    try:
        return PRIORITIES[value.strip().lower()]
    except KeyError:
        raise ValueError(
            f"invalid X-Priority {value.strip()!r}: expected low, normal, high or urgent"
        ) from None


class Lease:
    """One slot, held for an ``async with`` block (see :meth:`Admission.slot`): acquired on
    entry and released on exit, here and nowhere else."""

    __slots__ = ("_admission", "_ask", "backend", "served_s")

    def __init__(self, admission: Admission, ask: tuple[Any, ...]) -> None:
        self._admission = admission
        self._ask = ask
        self.served_s: float | None = None  # how long the backend served; None: it failed

    async def __aenter__(self) -> Lease:
        model, model_key, route, exclude, rank, enqueued, session, num_ctx, cloud = self._ask
        if cloud:
            self.backend: BackendState = self._admission.remote(model, model_key, exclude)
            return self
        self.backend = await self._admission.acquire(
            model,
            model_key,
            route,
            exclude,
            rank=rank,
            enqueued=enqueued,
            session=session,
            num_ctx=num_ctx,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        model_key, route, cloud = self._ask[1], self._ask[2], self._ask[8]
        if cloud:
            self._admission.remote_done(self.backend)
            return
        self._admission.release(self.backend, demand_key(model_key, route), self.served_s)


@dataclass(eq=False)
class Waiter:
    """One queued request."""

    model: str
    model_key: str | None
    route: str
    exclude: Collection[str]
    rank: int
    enqueued: float
    seq: int
    future: asyncio.Future[BackendState] = field(repr=False)
    session: str | None = None
    num_ctx: int | None = None

    def effective(self, now: float, aging_s: float) -> float:
        """Class rank, raised by one class for every ``aging_s`` waited (so low never starves)."""
        return self.rank + (now - self.enqueued) / aging_s


class Admission:
    """Hands out reserved slots; queues by priority when every eligible backend is full."""

    lease_type: type[Lease] = Lease  # what slot() hands out (SharedAdmission: its own)

    def __init__(
        self,
        router: Router,
        settings: QueueSettings,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.router = router
        self.registry = router.registry
        self.settings = settings
        self.metrics = metrics
        self._clock = clock
        # One list per priority class, each ordered by (enqueued, seq): within a class the
        # first waiter is also the one aging has lifted most, so dispatch looks at few.
        self._classes: list[list[Waiter]] = [[] for _ in PRIORITIES]
        self._count = 0
        self._seq = itertools.count()
        self.closed_reason: str | None = None
        self._remote: dict[str, int] = {}  # cloud requests passing through each backend
        self.registry.on_capacity(self.dispatch)
        self.registry.on_models(self._drop_unknown)
        for name in PRIORITIES:  # a series per class from the start: 0 until one queues
            metrics.queue_depth.labels(priority=name)

    @property
    def queued(self) -> int:
        return self._count

    def queued_by_priority(self) -> dict[str, int]:
        return {PRIORITY_NAMES[rank]: len(lst) for rank, lst in enumerate(self._classes)}

    def _add(self, waiter: Waiter) -> None:
        bisect.insort(self._classes[waiter.rank], waiter, key=lambda w: (w.enqueued, w.seq))
        self._count += 1

    def _discard(self, waiter: Waiter) -> bool:
        lst = self._classes[waiter.rank]
        for i, w in enumerate(lst):
            if w is waiter:
                del lst[i]
                self._count -= 1
                return True
        return False

    async def acquire(
        self,
        model: str,
        model_key: str | None,
        route: str,
        exclude: Collection[str] = (),
        *,
        rank: int = 1,
        enqueued: float | None = None,
        session: str | None = None,
        num_ctx: int | None = None,
    ) -> BackendState:
        """A backend with one slot already reserved for the caller (release it when done).

        ``enqueued`` keeps a retried request's place in the queue. Raises RoutingError
        (ModelNotFoundError, NoBackendError) when the request cannot be placed.
        """
        if self.closed_reason is not None:
            self._reject("draining")
            raise NoBackendError(self.closed_reason, self._retry_after())
        if not self._count or not any(self._classes[r] for r in range(rank, len(self._classes))):
            # Nobody waits ahead of this request: take a free slot if there is one.
            backend = self.router.pick(model, model_key, route, exclude, session, num_ctx)
            if backend is not None:
                self._grant(backend, model_key, route)
                return backend
        elif not self.router.eligible(model_key, exclude) and model_key not in self.registry.coming:
            # Others wait, but no backend lists the model: Ollama's 404 now, not after the
            # queue's timeout (and never a 503 the client would retry).
            raise ModelNotFoundError(model)
        return await self._wait(model, model_key, route, exclude, rank, enqueued, session, num_ctx)

    async def _wait(
        self,
        model: str,
        model_key: str | None,
        route: str,
        exclude: Collection[str],
        rank: int,
        enqueued: float | None,
        session: str | None = None,
        num_ctx: int | None = None,
    ) -> BackendState:
        if self._count >= self.settings.max_size:
            self._reject("queue_full")
            raise NoBackendError("all backends are busy and the queue is full", self._retry_after())
        now = self._clock()
        loop = asyncio.get_running_loop()
        waiter = Waiter(
            model,
            model_key,
            route,
            exclude,
            rank,
            now if enqueued is None else enqueued,
            next(self._seq),
            loop.create_future(),
            session,
            num_ctx,
        )
        self._add(waiter)
        gauge = self.metrics.queue_depth.labels(priority=PRIORITY_NAMES[rank])
        gauge.inc()
        demand = self.router.demand if model_key is not None else None
        if demand is not None:
            assert model_key is not None
            demand.queue(model_key, 1)
        self.dispatch()  # a slot may be free for this request already
        try:
            remaining = waiter.enqueued + self.settings.timeout_s - now
            return await asyncio.wait_for(asyncio.shield(waiter.future), max(remaining, 0))
        except TimeoutError:
            if waiter.future.done() and waiter.future.exception() is None:
                return waiter.future.result()  # granted at the deadline: use it
            self._reject("queue_timeout")
            raise NoBackendError(
                f"all backends are busy (waited {self.settings.timeout_s:g}s in queue)",
                self._retry_after(),
            ) from None
        except asyncio.CancelledError:
            # The client left (or corral stops): give back a slot granted meanwhile.
            if waiter.future.done() and waiter.future.exception() is None:
                self.release(waiter.future.result(), demand_key(model_key, route))
            raise
        finally:
            self._discard(waiter)
            if not waiter.future.done():
                waiter.future.cancel()
            gauge.dec()
            if demand is not None:
                assert model_key is not None
                demand.queue(model_key, -1)
            self.metrics.queue_wait.observe(self._clock() - now)

    def dispatch(self) -> None:
        """Grant free slots to waiters, most deserving first. Called when capacity appears."""
        if not self._count or not self._any_free():
            return
        aging = self.settings.aging_s
        while True:
            now = self._clock()
            best: Waiter | None = None
            best_key = (float("-inf"), 0)
            for lst in reversed(self._classes):
                for waiter in lst:
                    key = (waiter.effective(now, aging), -waiter.seq)
                    if key <= best_key:
                        break  # the rest of this class waited less: it cannot beat ``best``
                    if waiter.future.done():
                        continue
                    try:
                        servable = bool(
                            self.router.free(
                                waiter.model,
                                waiter.model_key,
                                waiter.exclude,
                                waiter.route,
                                waiter.num_ctx,
                                waiter.session,
                            )
                        )
                    except RoutingError:
                        servable = False  # its backends are down: it waits for its deadline
                    if servable:
                        best, best_key = waiter, key
                        break
            if best is None:
                return
            backend = self.router.pick(
                best.model, best.model_key, best.route, best.exclude, best.session, best.num_ctx
            )
            if backend is None:  # pragma: no cover - free() just said otherwise
                return
            self._grant(backend, best.model_key, best.route)
            best.future.set_result(backend)
            self._discard(best)
            if not self._count or not self._any_free():
                return

    def _drop_unknown(self) -> None:
        """The fleet's models changed: a waiter whose model no backend lists any more (it was
        deleted, or the pull it waited for failed) gets Ollama's 404 now."""
        known, coming = self.registry.known_models, self.registry.coming
        for waiter in [w for lst in self._classes for w in lst]:
            key = waiter.model_key
            unknown = key is not None and key not in known and key not in coming
            if unknown and not waiter.future.done():
                waiter.future.set_exception(ModelNotFoundError(waiter.model))

    def _grant(self, backend: BackendState, model_key: str | None, route: str) -> None:
        """Reserve a slot on ``backend`` (and count it for its model) before the caller wakes."""
        self.registry.reserve(backend)
        key = demand_key(model_key, route)
        if key is not None:
            self.router.demand.start(backend.id, key)

    def release(
        self, backend: BackendState, model_key: str | None, held_s: float | None = None
    ) -> None:
        """Give back a slot :meth:`acquire` granted (``model_key``: the model it was counted
        for, None for none); ``held_s``: how long it served (None: it failed)."""
        if model_key is not None:
            self.router.demand.end(backend.id, model_key, held_s)
        self.registry.release(backend)

    def slot(
        self,
        model: str,
        model_key: str | None,
        route: str,
        exclude: Collection[str] = (),
        *,
        rank: int = 1,
        enqueued: float | None = None,
        session: str | None = None,
        num_ctx: int | None = None,
        cloud: bool = False,
    ) -> Lease:
        """One slot for an ``async with`` block: granted (at once or from the queue) on entry,
        given back on exit whatever happens inside. Set ``lease.served_s`` when the backend
        answered, so that demand learns how long it takes. Entering raises as :meth:`acquire`."""
        ask = (model, model_key, route, exclude, rank, enqueued, session, num_ctx, cloud)
        return self.lease_type(self, ask)

    def remote(self, model: str, model_key: str | None, exclude: Collection[str]) -> BackendState:
        """A backend to pass a cloud model's request through (``name:cloud``, ``-cloud``
        tags): Ollama sends it to ollama.com, so it takes no GPU slot, waits in no queue and
        weighs no affinity. One that lists the model, else any; the least busy with such."""
        now = self._clock()
        up = [b for b in self.registry.all() if b.available(now) and b.id not in exclude]
        if not up:
            raise NoBackendError("no healthy backend available", self._retry_after())
        listing = [b for b in up if model_key in b.models] or up
        backend = min(listing, key=lambda b: self._remote.get(b.id, 0))
        self._remote[backend.id] = self._remote.get(backend.id, 0) + 1
        return backend

    def remote_done(self, backend: BackendState) -> None:
        self._remote[backend.id] = max(0, self._remote.get(backend.id, 0) - 1)

    def _any_free(self) -> bool:
        """Some backend takes requests and has a slot (else dispatching is pointless)."""
        now = self._clock()
        return any(
            b.in_flight + b.elsewhere < backend_cap(b) and b.available(now)
            for b in self.registry.all()
        )

    def close(self, reason: str) -> int:
        """Stop admitting (shutdown): every queued request gets 503 now; returns how many."""
        self.closed_reason = reason
        failed = 0
        for lst in self._classes:
            for waiter in list(lst):
                if not waiter.future.done():
                    waiter.future.set_exception(NoBackendError(reason, self._retry_after()))
                    failed += 1
                self._discard(waiter)
        if failed:
            self.metrics.rejections.labels(reason="draining").inc(failed)
        return failed

    def _reject(self, reason: str) -> None:
        self.metrics.rejections.labels(reason=reason).inc()

    def _retry_after(self) -> int:
        # Roughly how long until slots turn over; never less than a second.
        return max(1, math.ceil(min(self.settings.timeout_s, 30) / 4))
