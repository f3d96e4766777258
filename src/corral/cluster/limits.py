"""Shared limits: one token bucket per client-key name for the whole fleet.

The bucket is a small hash in Redis (tokens, when last refilled), refilled and taken from by
one script on Redis' clock, so replicas with drifting clocks agree. While Redis is away the
answer is None: the caller decides with its own local bucket (a single corral's behaviour).
"""

from __future__ import annotations

from corral.cluster import lua
from corral.cluster.link import ClusterUnavailableError, Keys, RedisLink


class SharedLimits:
    """Token buckets in Redis, one round trip per take."""

    def __init__(self, link: RedisLink, keys: Keys) -> None:
        self._link = link
        self._keys = keys
        self._bucket = link.redis.register_script(lua.BUCKET)

    async def wait_s(self, bucket: str, rate: float, burst: float) -> float | None:
        """Take one token from ``bucket`` (``rate`` a second, at most ``burst`` saved): 0.0
        when taken, else the seconds until one will be there; None: Redis is away, decide
        locally."""
        if not self._link.up:
            return None
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        try:
            taken, left = await self._link.run(
                self._bucket(keys=[self._keys.bucket(bucket)], args=[rate, burst])
            )
        except ClusterUnavailableError:
            return None
        if taken:
            return 0.0
        return max(0.0, (1.0 - float(left)) / rate)

    async def take(self, bucket: str, rate: float, burst: float) -> bool | None:
        """True when a token was taken, False when the bucket is empty, None: decide
        locally (Redis is away)."""
        wait = await self.wait_s(bucket, rate, burst)
        return None if wait is None else wait == 0.0
