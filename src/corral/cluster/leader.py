"""One leader: a lock in Redis with a TTL, taken with SET NX PX and kept by compare-and-extend.

The leader renews every ``lease_s/3``; a follower asks when the lock will expire and tries
again right then (at most ``lease_s/3`` later), so when the leader dies another replica leads
within ``lease_s`` of its last renewal. A leader that stops cleanly gives the lock up at once.

Redis away: the leader keeps leading until its lock would have expired (``lease_s`` after it
sent its last successful renewal, on its own monotonic clock, so never after Redis would let
another replica take it), then steps down. A short blip thus does not stop and restart the
placement manager, and there is never a second leader. A long outage leaves no leader at all:
without Redis, replicas cannot agree on one, and work that must run once is better not run
than run by every replica against the others. Followers never lead while Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from corral.cluster import lua
from corral.cluster.link import ClusterUnavailableError, Keys, RedisLink

log = structlog.get_logger("corral.cluster")


class Leadership:
    """Whether this replica leads, kept current by :meth:`run` while Redis answers."""

    def __init__(self, link: RedisLink, keys: Keys, replica: str, lease_s: float) -> None:
        self._link = link
        self._keys = keys
        self._replica = replica
        self._lease_s = lease_s
        self._ttl_ms = max(1, round(lease_s * 1000))
        self.is_leader = False
        self._valid_until = 0.0  # monotonic: when the lock would expire without renewal
        self._callbacks: list[Callable[[bool], None]] = []
        self._step_down: asyncio.TimerHandle | None = None
        self._claim = link.redis.register_script(lua.LEADER_CLAIM)
        self._resign = link.redis.register_script(lua.LEADER_RESIGN)

    def on_leadership(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(True)`` when this replica becomes leader, ``callback(False)`` when it
        stops being one."""
        self._callbacks.append(callback)

    def _set(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        log.info("cluster leadership " + ("taken" if leader else "given up"))
        for callback in self._callbacks:
            try:
                callback(leader)
            except Exception:
                log.exception("cluster: on_leadership callback failed")

    async def claim(self) -> float:
        """Take or extend the lock; the seconds until the next try. Raises
        ClusterUnavailableError."""
        sent = time.monotonic()
        leads, remaining_ms = await self._link.run(
            self._claim(keys=[self._keys.leader], args=[self._replica, self._ttl_ms])
        )
        if leads:
            self._valid_until = sent + self._lease_s
            self._cancel_step_down()
            self._set(True)
            return self._lease_s / 3
        self._set(False)
        # Right when the current lock expires (a millisecond after), at most lease_s/3 on.
        remaining = max(0, int(remaining_ms)) / 1000
        return min(self._lease_s / 3, remaining + 0.001)

    async def run(self) -> None:
        """Claim or renew until Redis fails (ClusterUnavailableError ends it)."""
        while True:
            delay_s = await self.claim()
            await asyncio.sleep(delay_s)

    def lost_redis(self) -> None:
        """Redis is away: keep leading only until the lock would have expired."""
        if not self.is_leader:
            return
        remaining = self._valid_until - time.monotonic()
        if remaining <= 0:
            self._set(False)
            return
        self._cancel_step_down()
        self._step_down = asyncio.get_running_loop().call_later(remaining, self._expired)

    def _expired(self) -> None:
        self._step_down = None
        if not self._link.up:
            log.warning("cluster leadership lapsed while Redis was away")
            self._set(False)

    def _cancel_step_down(self) -> None:
        if self._step_down is not None:
            self._step_down.cancel()
            self._step_down = None

    async def resign(self) -> None:
        """Give the lock up (clean stop), so another replica leads at once."""
        self._cancel_step_down()
        if self.is_leader and self._link.up:
            with contextlib.suppress(ClusterUnavailableError):
                await self._link.run(self._resign(keys=[self._keys.leader], args=[self._replica]))
        self._set(False)
