"""Fleet-wide slots: one lease in Redis per request on a backend, expired if its replica dies.

A backend's leases live in one sorted set (member: lease id ``replica:n``, score: expiry in
Redis' milliseconds). Taking one is one atomic script (drop expired, count, add when under the
limit), giving it back another: two round trips per request. Both answer the fleet-wide count,
and both announce it (``{name}:taken``, ``{name}:freed``), so every replica's
:meth:`FleetSlots.in_flight` stays current without asking. The heartbeat (every ``lease_s/3``)
extends this replica's live leases, re-adds them after an outage, and re-counts, so the leases
of a replica that died free within ``lease_s`` and the others hear of it.

While Redis is down a lease is taken locally, counted against the same limit among this
replica's own leases (the local view a single corral has); it joins Redis at the resync.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from corral.cluster import lua
from corral.cluster.link import ClusterUnavailableError, Keys, RedisLink, decode

log = structlog.get_logger("corral.cluster")

# Leases released while Redis was away, removed from it at the resync (else they would only
# expire): capped, since expiry cleans up the rest.
_MAX_FORGOTTEN = 10_000


@dataclass(eq=False, slots=True)
class SlotLease:
    """One slot on one backend, held for one request."""

    backend_id: str
    id: str
    shared: bool  # granted by Redis (False: granted locally while Redis was away)


class FleetSlots:
    """Acquire and release slots fleet-wide; the fleet-wide in-flight count per backend."""

    def __init__(self, link: RedisLink, keys: Keys, replica: str, lease_s: float) -> None:
        self._link = link
        self._keys = keys
        self._replica = replica
        self._lease_ms = max(1, round(lease_s * 1000))
        self._seq = itertools.count(1)
        self._held: dict[str, dict[str, SlotLease]] = {}
        self._forgotten: dict[str, set[str]] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # backend -> (count, stamp)
        self._freed: list[Callable[[str], None]] = []
        self._counted: list[Callable[[str, int], None]] = []
        self._releasing: set[asyncio.Task[None]] = set()
        redis = link.redis
        self._acquire = redis.register_script(lua.ACQUIRE)
        self._release = redis.register_script(lua.RELEASE)
        self._tick = redis.register_script(lua.TICK)

    # The hot path -------------------------------------------------------------------------

    def in_flight(self, backend_id: str) -> int:
        """Leases on ``backend_id`` fleet-wide, as last seen (never fewer than this replica's
        own); while Redis is away, this replica's own only. No I/O."""
        own = len(self._held.get(backend_id, ()))
        if not self._link.up:
            return own
        seen = self._seen.get(backend_id)
        return own if seen is None else max(seen[0], own)

    def elsewhere(self, backend_id: str) -> int:
        """Leases other replicas hold on ``backend_id``, as last seen (0 while Redis is away:
        the local view). No I/O."""
        seen = self._seen.get(backend_id)
        if seen is None or not self._link.up:
            return 0
        return max(0, seen[0] - self.held(backend_id))

    def on_count(self, callback: Callable[[str, int], None]) -> None:
        """Call ``callback(backend_id, elsewhere)`` whenever a fleet-wide count is heard
        (every acquire and release answer, announcement and recount), ``elsewhere`` being
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

    def held(self, backend_id: str) -> int:
        """This replica's own leases on ``backend_id``."""
        return len(self._held.get(backend_id, ()))

    async def acquire(self, backend_id: str, limit: int) -> SlotLease | None:
        """A slot on ``backend_id`` if fewer than ``limit`` are held fleet-wide, else None.

        One round trip; while Redis is away (or when it fails now), a local lease counted
        against ``limit`` among this replica's own."""
        if limit <= 0:
            return None
        lease_id = f"{self._replica}:{next(self._seq)}"
        if self._link.up:
            try:
                granted, count, stamp = await self._link.run(
                    self._acquire(
                        keys=[self._keys.slots(backend_id)],
                        args=[
                            lease_id,
                            limit,
                            self._lease_ms,
                            self._keys.taken,
                            self._replica,
                            backend_id,
                        ],
                    )
                )
            except ClusterUnavailableError:
                pass  # decided locally below; the same id joins Redis at the resync
            else:
                self._see(backend_id, int(count), int(stamp))
                if not granted:
                    return None
                return self._hold(SlotLease(backend_id, lease_id, shared=True))
        if self.held(backend_id) >= limit:
            return None
        return self._hold(SlotLease(backend_id, lease_id, shared=False))

    async def release(self, lease: SlotLease) -> None:
        """Give the slot back (one round trip; locally while Redis is away). Idempotent."""
        held = self._held.get(lease.backend_id)
        if held is None or held.pop(lease.id, None) is None:
            return
        if not held:
            del self._held[lease.backend_id]
        if self._link.up:
            try:
                count, stamp = await self._link.run(
                    self._release(
                        keys=[self._keys.slots(lease.backend_id)],
                        args=[lease.id, self._keys.freed, self._replica, lease.backend_id],
                    )
                )
            except ClusterUnavailableError:
                pass
            else:
                # This replica's own release: its caller wakes its own queue.
                self._see(lease.backend_id, int(count), int(stamp), wake=False)
                return
        forgotten = self._forgotten.setdefault(lease.backend_id, set())
        if len(forgotten) < _MAX_FORGOTTEN:
            forgotten.add(lease.id)

    def release_nowait(self, lease: SlotLease) -> None:
        """:meth:`release` from synchronous code (a cancelled request's clean-up): the slot
        leaves this replica's count now, Redis hears of it in the background."""
        task = asyncio.get_running_loop().create_task(self.release(lease))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def on_freed(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(backend_id)`` when another replica frees a slot on that backend (or
        a dead replica's leases expired): this replica's queue may dispatch."""
        self._freed.append(callback)

    # Announcements and the heartbeat ------------------------------------------------------

    def _hold(self, lease: SlotLease) -> SlotLease:
        self._held.setdefault(lease.backend_id, {})[lease.id] = lease
        return lease

    def _see(self, backend_id: str, count: int, stamp: int, *, wake: bool = True) -> bool:
        """Record a fleet-wide count; True when it is news (not older than what was seen).
        A count lower than the last one seen means slots freed somewhere (a release this
        replica did not hear, or a dead replica's leases dropped): its waiters are woken."""
        seen = self._seen.get(backend_id)
        if seen is not None and seen[1] > stamp:
            return False
        self._seen[backend_id] = (count, stamp)
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
        """The heartbeat: extend (or re-add) this replica's live leases, forget the ones it
        released while Redis was away, and re-count every backend it knows of (``watch`` and
        any seen). A count that fell means slots freed somewhere unannounced (a replica died):
        the waiters hear of it. One round trip. Raises ClusterUnavailableError."""
        known = self._seen.keys() | self._held.keys() | self._forgotten.keys()
        backends = sorted(set(watch) | known)
        if not backends:
            return
        args: list[str | int] = [self._lease_ms]
        for backend_id in backends:
            held = list(self._held.get(backend_id, ()))
            forgotten = list(self._forgotten.get(backend_id, ()))
            args += [len(held), *held, len(forgotten), *forgotten]
        answer = await self._link.run(
            self._tick(keys=[self._keys.slots(b) for b in backends], args=args)
        )
        for backend_id in backends:  # they are in Redis now, or gone from it
            self._forgotten.pop(backend_id, None)
            for lease in self._held.get(backend_id, {}).values():
                lease.shared = True
        stamp = int(answer[0])
        for backend_id, count in zip(backends, answer[1:], strict=True):
            self._see(backend_id, int(count), stamp)

    async def close(self) -> None:
        """Finish the releases still under way (bounded by the link's timeout each)."""
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
