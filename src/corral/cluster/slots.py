"""Fleet-wide slots: units of a backend's capacity leased from Redis, reused locally.

A backend's capacity lives in one sorted set (member: unit id ``replica:n``, score: expiry in
Redis' milliseconds); the set never holds more than the backend's limit, so the units every
replica holds together never exceed it. A replica keeps the units it leased: a request takes
a free one locally (no Redis at all) and gives it back locally. Only when this replica holds
no free unit does it ask Redis for more, in one script that grants up to what its queue wants
and what is free fleet-wide (``{name}:taken`` announces the new count). Units idle for
``idle_s`` go back to Redis in one script (``{name}:freed`` announces it, waking the other
replicas' waiters). A replica denied units announces it on ``{name}:wanted`` (rate-limited,
with its most urgent waiter's priority); a replica that hears it hands back its idle units at
once and, while the want lasts, also the units its requests finish with when the wanting
replica's waiter is of a more urgent class than its own, or of the same class and it holds
more than its fair share (``limit / replicas wanting``), so units flow to where the requests
are, the most urgent first.

The heartbeat (every ``lease_s/3``) extends every unit this replica holds, busy or free,
re-adds them after an outage, and re-counts: the units of a replica that died free within
``lease_s`` and the others hear of it. The fleet-wide counts routing sees
(:meth:`FleetSlots.elsewhere`) are the units the other replicas hold, as last heard (grants,
give-backs, the heartbeat's recount): a little stale, and counting a unit up to ``idle_s``
after its request ended; the cap itself is Redis' and never stale.

While Redis is down a slot is taken locally, counted against the same limit among this
replica's own requests (the local view a single corral has); its unit joins Redis at the
resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import structlog

from corral.cluster import lua
from corral.cluster.link import ClusterUnavailableError, Keys, RedisLink, decode

log = structlog.get_logger("corral.cluster")

# Units given back while Redis was away, removed from it at the resync (else they would only
# expire): capped, since expiry cleans up the rest.
_MAX_FORGOTTEN = 10_000


@dataclass(eq=False, slots=True)
class SlotLease:
    """One slot on one backend, held for one request: the unit it uses."""

    backend_id: str
    id: str  # the unit
    shared: bool  # the unit is in Redis (False: made locally while Redis was away)


@dataclass(eq=False, slots=True)
class _Pool:
    """This replica's units on one backend."""

    units: set[str] = field(default_factory=set)  # every unit held, busy or free
    free: dict[str, float] = field(default_factory=dict)  # free unit -> when it fell idle
    busy: dict[str, SlotLease] = field(default_factory=dict)  # unit -> its request's lease
    local: set[str] = field(default_factory=set)  # made while Redis was away, not yet in it
    limit: int = 0  # the limit last asked with


class FleetSlots:
    """Acquire and release slots fleet-wide; the fleet-wide in-flight count per backend."""

    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        replica: str,
        lease_s: float,
        *,
        idle_s: float = 0.05,
        want_every_s: float = 0.1,
        want_ttl_s: float = 0.35,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._keys = keys
        self._replica = replica
        self._lease_ms = max(1, round(lease_s * 1000))
        self.idle_s = idle_s
        self._want_every_s = want_every_s
        self._want_ttl_s = want_ttl_s
        self._clock = clock
        self._seq = itertools.count(1)
        self._pools: dict[str, _Pool] = {}
        self._forgotten: dict[str, set[str]] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # backend -> (count, stamp)
        self._heard_at: dict[str, float] = {}  # backend -> when its count was last heard
        self._wants: dict[str, dict[str, tuple[float | None, float]]] = {}
        self._wanted: dict[str, tuple[float, float | None]] = {}  # backend -> (sent at, prio)
        self._freed: list[Callable[[str], None]] = []
        self._counted: list[Callable[[str, int], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweep_at: asyncio.TimerHandle | None = None
        self._sweep_due = math.inf
        # This replica's most urgent waiter (effective priority; None: nobody waits).
        self.best: Callable[[], float | None] = lambda: None
        # When a replica last said nobody waits there (the urgency board): its wants heard
        # before that are over.
        self.settled: Callable[[str], float] = lambda replica: -math.inf
        self.grants = 0  # grant scripts run (round trips asking for units)
        self.returns = 0  # give-back scripts run
        redis = link.redis
        self._grant = redis.register_script(lua.GRANT)
        self._return = redis.register_script(lua.RETURN)
        self._tick = redis.register_script(lua.TICK)

    # The hot path -------------------------------------------------------------------------

    def in_flight(self, backend_id: str) -> int:
        """Units on ``backend_id`` fleet-wide, as last seen (never fewer than this replica's
        own); while Redis is away, this replica's own requests only. No I/O."""
        pool = self._pools.get(backend_id)
        if not self._link.up:
            return 0 if pool is None else len(pool.busy)
        own = 0 if pool is None else len(pool.units)
        seen = self._seen.get(backend_id)
        return own if seen is None else max(seen[0], own)

    def elsewhere(self, backend_id: str) -> int:
        """Units other replicas hold on ``backend_id``, as last seen (0 while Redis is away:
        the local view). No I/O."""
        seen = self._seen.get(backend_id)
        if seen is None or not self._link.up:
            return 0
        return max(0, seen[0] - self.held(backend_id))

    def held(self, backend_id: str) -> int:
        """Units this replica holds on ``backend_id`` (busy or free)."""
        pool = self._pools.get(backend_id)
        return 0 if pool is None else len(pool.units)

    def busy(self, backend_id: str) -> int:
        """This replica's requests holding a slot on ``backend_id``."""
        pool = self._pools.get(backend_id)
        return 0 if pool is None else len(pool.busy)

    def on_count(self, callback: Callable[[str, int], None]) -> None:
        """Call ``callback(backend_id, elsewhere)`` whenever a fleet-wide count is heard
        (grant and give-back answers, announcements and recounts), ``elsewhere`` being
        :meth:`elsewhere`; and with 0 for every backend when Redis goes away."""
        self._counted.append(callback)

    def _tell(self, backend_id: str) -> None:
        others = self.elsewhere(backend_id)
        for callback in self._counted:
            try:
                callback(backend_id, others)
            except Exception:
                log.exception("cluster: on_count callback failed", backend=backend_id)

    def lost(self) -> None:
        """Redis went away: every backend's count is this replica's own again."""
        for backend_id in list(self._seen):
            self._tell(backend_id)

    def reuse(self, backend_id: str, limit: int) -> SlotLease | None:
        """The common case of :meth:`acquire`, with no await: a free unit this replica holds
        (None: ask :meth:`acquire`, which also covers every other case)."""
        pool = self._pools.get(backend_id)
        if pool is None or not pool.free or pool.limit != limit or len(pool.busy) >= limit:
            return None
        seen = self._seen.get(backend_id)
        if not self._link.up or (seen is not None and seen[0] > limit):
            return None
        return self._use(backend_id, pool)

    async def acquire(
        self, backend_id: str, limit: int, want: int = 1, priority: float | None = None
    ) -> SlotLease | None:
        """A slot on ``backend_id`` if fewer than ``limit`` are held fleet-wide, else None.

        A free unit this replica holds is taken with no I/O. Else one round trip asks Redis
        for up to ``want`` units (this replica's queue); denied, this replica announces that it
        wants units (``priority``: the waiter's). While Redis is away (or when it fails now),
        a local slot counted against ``limit`` among this replica's own requests."""
        if limit <= 0:
            return None
        pool = self._pools.get(backend_id)
        if pool is None:
            pool = self._pools[backend_id] = _Pool()
        pool.limit = limit
        if not self._link.up:
            return None if len(pool.busy) >= limit else self._use(backend_id, pool)
        seen = self._seen.get(backend_id)
        if seen is not None and seen[0] > limit and pool.free:
            # The limit came down: what this replica holds idle goes back first.
            self._give_back(backend_id, pool, list(pool.free))
        if pool.free and len(pool.busy) < limit:
            return self._use(backend_id, pool)
        full = (
            seen is not None
            and seen[0] >= limit
            and self._clock() - self._heard_at.get(backend_id, -math.inf) < self._want_every_s
        )
        if full or self._defers(backend_id, pool, priority):
            # Full fleet-wide, as heard just now: no round trip to be told so again (a unit
            # given back anywhere is announced, and wakes this replica's queue); or another
            # replica wants units more (a unit this replica just gave it must not come back).
            self.want(backend_id, priority if priority is not None else self.best())
            return None
        ask = max(1, min(want, limit))
        ids = [f"{self._replica}:{next(self._seq)}" for _ in range(ask)]
        self.grants += 1
        try:
            granted, count, stamp = await self._link.run(
                self._grant(
                    keys=[self._keys.slots(backend_id)],
                    args=[
                        limit,
                        self._lease_ms,
                        self._keys.taken,
                        self._replica,
                        backend_id,
                        *ids,
                    ],
                )
            )
        except ClusterUnavailableError:
            # Decided locally; the unit joins Redis at the resync.
            return None if len(pool.busy) >= limit else self._use(backend_id, pool)
        now = self._clock()
        for unit in ids[: int(granted)]:
            pool.units.add(unit)
            pool.free[unit] = now
        self._see(backend_id, int(count), int(stamp))
        if not pool.free or len(pool.busy) >= limit:
            self.want(backend_id, priority if priority is not None else self.best())
            return None
        lease = self._use(backend_id, pool)
        if pool.free:
            self._schedule_sweep(self.idle_s)
        return lease

    def _use(self, backend_id: str, pool: _Pool) -> SlotLease:
        """Take a free unit (the most recently freed: the oldest go idle and back), or make
        a local one (Redis away)."""
        if pool.free:
            unit, _ = pool.free.popitem()
        else:
            unit = f"{self._replica}:{next(self._seq)}"
            pool.units.add(unit)
            pool.local.add(unit)
        lease = SlotLease(backend_id, unit, shared=unit not in pool.local)
        pool.busy[unit] = lease
        return lease

    async def release(self, lease: SlotLease) -> None:
        """The request is done with its slot: its unit is free here again (no I/O), or goes
        back to Redis at once when another replica wants it more (one round trip).
        Idempotent."""
        pool = self._pools.get(lease.backend_id)
        if pool is None or pool.busy.pop(lease.id, None) is None:
            return
        backend_id = lease.backend_id
        if self._link.up and self._yields(backend_id, pool):
            pool.units.discard(lease.id)
            await self._return_units(backend_id, [lease.id])
            return
        pool.free[lease.id] = self._clock()
        self._schedule_sweep(self.idle_s)

    def keep(self, lease: SlotLease) -> bool:
        """The common case of :meth:`release`, with no await: the unit stays here, free
        (False: it must go back to Redis; call :meth:`release`)."""
        pool = self._pools.get(lease.backend_id)
        if pool is None or lease.id not in pool.busy:
            return True
        if self._link.up and self._yields(lease.backend_id, pool):
            return False
        del pool.busy[lease.id]
        pool.free[lease.id] = self._clock()
        self._schedule_sweep(self.idle_s)
        return True

    def release_nowait(self, lease: SlotLease) -> None:
        """:meth:`release` from synchronous code (a cancelled request's clean-up)."""
        self._spawn(self.release(lease))

    def on_freed(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(backend_id)`` when another replica frees units on that backend (or
        a dead replica's units expired): this replica's queue may dispatch."""
        self._freed.append(callback)

    # Units flowing between replicas -------------------------------------------------------

    def want(self, backend_id: str, priority: float | None) -> None:
        """Tell the other replicas that this one wants units on ``backend_id`` (its best
        waiter's ``priority``), at most every ``want_every_s`` unless more urgent now."""
        if not self._link.up:
            return
        now = self._clock()
        last = self._wanted.get(backend_id)
        if last is not None and now - last[0] < self._want_every_s:
            sent = last[1]
            if priority is None or (sent is not None and priority <= sent):
                return
        self._wanted[backend_id] = (now, priority)
        text = "-" if priority is None else f"{priority:.3f}"
        message = f"{self._replica} {text} {backend_id}"
        self._spawn(self._publish(self._keys.wanted, message))

    async def _publish(self, channel: str, message: str) -> None:
        with contextlib.suppress(ClusterUnavailableError):
            await self._link.run(self._link.redis.publish(channel, message))

    def heard_want(self, data: bytes) -> None:
        """A message on ``{name}:wanted``: "replica priority backend" (priority "-": none
        known). Idle units on that backend go back soon."""
        try:
            replica, text, backend_id = decode(data).split(" ", 2)
            priority = None if text == "-" else float(text)
        except ValueError:
            log.warning("cluster: malformed want announcement ignored")
            return
        if replica == self._replica:
            return
        self._wants.setdefault(backend_id, {})[replica] = (priority, self._clock())
        pool = self._pools.get(backend_id)
        if pool is not None and pool.free:
            # A moment first: a local waiter granted this unit may be about to take it.
            self._schedule_sweep(0.002)

    def _live_wants(self, backend_id: str) -> dict[str, tuple[float | None, float]]:
        wants = self._wants.get(backend_id)
        if not wants:
            return {}
        now = self._clock()
        for replica, (_, at) in list(wants.items()):
            if now - at > self._want_ttl_s or at < self.settled(replica):
                del wants[replica]
        return wants

    def _yields(self, backend_id: str, pool: _Pool) -> bool:
        """Should a unit this replica's request just finished with go back to Redis now?
        Only while another replica wants units on the backend: yes when nobody waits here,
        else as :meth:`_outranked`."""
        wants = self._live_wants(backend_id)
        if not wants:
            return False
        mine = self.best()
        return mine is None or self._outranked(wants, pool, mine, len(pool.units) - 1)

    def _defers(self, backend_id: str, pool: _Pool, priority: float | None) -> bool:
        """Should this replica leave the units free in Redis to a replica that wants them
        (rather than take one for a request of ``priority``)?"""
        wants = self._live_wants(backend_id)
        mine = priority if priority is not None else self.best()
        return (
            bool(wants) and mine is not None and self._outranked(wants, pool, mine, len(pool.units))
        )

    @staticmethod
    def _outranked(
        wants: dict[str, tuple[float | None, float]], pool: _Pool, mine: float, keep: int
    ) -> bool:
        """A wanting replica's waiter is of a more urgent class (the whole part of the
        effective priority, as the urgency board compares) than ``mine``; or of the same
        class while this replica would keep (``keep`` units) its fair share or more."""
        known = [p for p, _ in wants.values() if p is not None]
        if known:
            theirs, ours = math.floor(max(known)), math.floor(mine)
            if theirs != ours:
                return theirs > ours
        return keep >= math.ceil(pool.limit / (1 + len(wants)))

    def _schedule_sweep(self, delay: float) -> None:
        due = self._clock() + delay
        if self._sweep_at is not None and self._sweep_due <= due:
            return
        if self._sweep_at is not None:
            self._sweep_at.cancel()
        self._sweep_due = due
        self._sweep_at = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """Give back the units idle for ``idle_s`` (or for a moment, where another replica
        wants them); come back when the next one will be."""
        self._sweep_at, self._sweep_due = None, math.inf
        now = self._clock()
        next_due = math.inf
        for backend_id, pool in self._pools.items():
            if not pool.free:
                continue
            wait = 0.002 if self._live_wants(backend_id) else self.idle_s
            due = [unit for unit, at in pool.free.items() if now - at >= wait]
            if due:
                self._give_back(backend_id, pool, due)
            for at in pool.free.values():
                next_due = min(next_due, at + self.idle_s)
        if next_due < math.inf:
            self._schedule_sweep(max(0.0, next_due - now))

    def _give_back(self, backend_id: str, pool: _Pool, units: list[str]) -> None:
        for unit in units:
            pool.free.pop(unit, None)
            pool.units.discard(unit)
        self._spawn(self._return_units(backend_id, units))

    async def _return_units(self, backend_id: str, units: list[str]) -> None:
        """Remove ``units`` (no longer held here) from Redis: one round trip; forgotten (and
        removed at the resync) while Redis is away."""
        pool = self._pools.get(backend_id)
        if pool is not None:
            pool.local.difference_update(units)
        if self._link.up:
            self.returns += 1
            try:
                count, stamp = await self._link.run(
                    self._return(
                        keys=[self._keys.slots(backend_id)],
                        args=[self._keys.freed, self._replica, backend_id, *units],
                    )
                )
            except ClusterUnavailableError:
                pass
            else:
                # This replica's own give-back: its caller wakes its own queue.
                self._see(backend_id, int(count), int(stamp), wake=False)
                return
        self._forget(backend_id, units)

    def _forget(self, backend_id: str, units: list[str]) -> None:
        forgotten = self._forgotten.setdefault(backend_id, set())
        for unit in units:
            if len(forgotten) >= _MAX_FORGOTTEN:
                break
            forgotten.add(unit)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Announcements and the heartbeat ------------------------------------------------------

    def _see(self, backend_id: str, count: int, stamp: int, *, wake: bool = True) -> bool:
        """Record a fleet-wide count; True when it is news (not older than what was seen).
        A count lower than the last one seen means units freed somewhere (a give-back this
        replica did not hear, or a dead replica's units dropped): its waiters are woken."""
        seen = self._seen.get(backend_id)
        if seen is not None and seen[1] > stamp:
            return False
        self._seen[backend_id] = (count, stamp)
        self._heard_at[backend_id] = self._clock()
        if self._counted:
            self._tell(backend_id)
        if wake and seen is not None and count < seen[0]:
            self._wake(backend_id)
        return True

    def heard(self, channel: str, data: bytes) -> None:
        """A message on ``{name}:taken`` or ``{name}:freed``: "count stamp replica backend"."""
        try:
            count, stamp, replica, backend_id = decode(data).split(" ", 3)
            freed = channel == self._keys.freed and replica != self._replica
            fresh = self._see(backend_id, int(count), int(stamp), wake=not freed)
        except ValueError:
            log.warning("cluster: malformed slot announcement ignored", channel=channel)
            return
        if fresh and freed:
            self._wake(backend_id)

    def _wake(self, backend_id: str) -> None:
        for callback in self._freed:
            try:
                callback(backend_id)
            except Exception:
                log.exception("cluster: on_freed callback failed", backend=backend_id)

    async def tick(self, watch: set[str]) -> None:
        """The heartbeat: extend (or re-add) every unit this replica holds, forget the ones
        it gave back while Redis was away, and re-count every backend it knows of (``watch``
        and any seen). A count that fell means units freed somewhere unannounced (a replica
        died): the waiters hear of it. One round trip. Raises ClusterUnavailableError."""
        known = self._seen.keys() | self._pools.keys() | self._forgotten.keys()
        backends = sorted(set(watch) | known)
        if not backends:
            return
        args: list[str | int] = [self._lease_ms]
        sent: dict[str, list[str]] = {}
        dropped: dict[str, list[str]] = {}
        for backend_id in backends:
            pool = self._pools.get(backend_id)
            held = sent[backend_id] = [] if pool is None else list(pool.units)
            forgotten = dropped[backend_id] = list(self._forgotten.pop(backend_id, ()))
            args += [len(held), *held, len(forgotten), *forgotten]
        try:
            answer = await self._link.run(
                self._tick(keys=[self._keys.slots(b) for b in backends], args=args)
            )
        except ClusterUnavailableError:
            for backend_id in backends:  # what it would have re-added stays wanted
                pool = self._pools.get(backend_id)
                gone = [u for u in sent[backend_id] if pool is None or u not in pool.units]
                self._forget(backend_id, dropped[backend_id] + gone)
            raise
        for backend_id in backends:
            pool = self._pools.get(backend_id)
            # A unit given back while this tick was on its way may have been re-added by it.
            gone = [u for u in sent[backend_id] if pool is None or u not in pool.units]
            if gone:
                self._forget(backend_id, gone)
            if pool is not None:  # in Redis now
                pool.local.difference_update(sent[backend_id])
                for lease in pool.busy.values():
                    lease.shared = lease.id not in pool.local
        stamp = int(answer[0])
        for backend_id, count in zip(backends, answer[1:], strict=True):
            self._see(backend_id, int(count), stamp)

    async def close(self) -> None:
        """Give every unit back (another replica may use it at once) and finish the
        give-backs under way (bounded by the link's timeout each)."""
        if self._sweep_at is not None:
            self._sweep_at.cancel()
            self._sweep_at = None
        for backend_id, pool in self._pools.items():
            if pool.units and self._link.up:
                units = list(pool.units)
                pool.units.clear()
                pool.free.clear()
                self._spawn(self._return_units(backend_id, units))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
