"""Who waits most urgently, fleet-wide: so the most urgent waiter wins a freed slot without a
central queue.

Each replica keeps its own priority queue. When a slot frees, every replica hears it and its
best waiter races for it; Redis decides the race (the first acquire wins), which on its own
is chance. So each replica announces its best waiter's effective priority (class rank plus
aging, as the local queue computes it) on ``{name}:waiting`` when it changes class and with
every heartbeat while anyone waits; the others keep the latest value per replica (dropped
after ``stale_s`` without news). On a freed slot a replica whose best waiter is less urgent
than some other replica's waits ``grace_s`` before claiming: the more urgent replica's claim
reaches Redis first, and if it cannot use that backend (another model), the slot is claimed
a few milliseconds later anyway. No slot is ever held back longer than ``grace_s``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import structlog

from corral.cluster.link import ClusterUnavailableError, Keys, RedisLink, decode

log = structlog.get_logger("corral.cluster")


class UrgencyBoard:
    """This replica's best waiter, announced; the others', heard."""

    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        replica: str,
        *,
        grace_s: float,
        stale_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._keys = keys
        self._replica = replica
        self.grace_s = grace_s
        self._stale_s = stale_s
        self._clock = clock
        self.mine: float | None = None  # this replica's best waiter (None: nobody waits)
        self._announced: float | None = None
        self._others: dict[str, tuple[float, float]] = {}  # replica -> (priority, heard at)
        self._settled: dict[str, float] = {}  # replica -> when it said nobody waits there
        self._sending: asyncio.Task[None] | None = None

    def publish(self, best: float | None) -> None:
        """This replica's most urgent waiter's effective priority now (None: nobody waits).

        Announced in the background when its class (the whole part) changed; cheap to call
        on every queue change."""
        self.mine = best
        if _band(best) == _band(self._announced):
            return
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while _band(self.mine) != _band(self._announced) and self._link.up:
            try:
                await self.announce()
            except ClusterUnavailableError:
                return

    async def announce(self) -> None:
        """Publish this replica's best waiter now. Raises ClusterUnavailableError."""
        value = self.mine
        text = "-" if value is None else f"{value:.3f}"
        await self._link.run(
            self._link.redis.publish(self._keys.waiting, f"{self._replica} {text}")
        )
        self._announced = value

    def heard(self, data: bytes) -> None:
        """A message on ``{name}:waiting``: "replica priority" or "replica -"."""
        try:
            replica, text = decode(data).split(" ", 1)
            if replica == self._replica:
                return
            if text == "-":
                self._others.pop(replica, None)
                self._settled[replica] = self._clock()
            else:
                self._others[replica] = (float(text), self._clock())
        except ValueError:
            log.warning("cluster: malformed waiting announcement ignored")

    def settled(self, replica: str) -> float:
        """When ``replica`` last said nobody waits there (-inf: never heard)."""
        return self._settled.get(replica, -math.inf)

    def best_elsewhere(self) -> float | None:
        """The most urgent waiter on another replica, as last heard (None: none known)."""
        now = self._clock()
        best: float | None = None
        for replica, (value, at) in list(self._others.items()):
            if now - at > self._stale_s:
                del self._others[replica]
            elif best is None or value > best:
                best = value
        return best

    def yield_s(self, mine: float) -> float:
        """How long a waiter of effective priority ``mine`` should let a freed slot go to a
        more urgent replica first: ``grace_s`` when one is known to wait, else 0."""
        if not self._link.up:
            return 0.0
        best = self.best_elsewhere()
        return self.grace_s if best is not None and best > mine else 0.0

    def forget(self) -> None:
        """Redis was away: what others said is stale; announce this replica's best again."""
        self._others.clear()
        self._settled.clear()
        self._announced = None


def _band(value: float | None) -> int | None:
    return None if value is None else math.floor(value)
