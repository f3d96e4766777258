"""The retry budget: retries stay a bounded share of requests, even in a failure storm."""

from __future__ import annotations

import time
from collections.abc import Callable


class RetryBudget:
    """A token bucket that keeps retries to ``ratio`` of requests (Finagle's RetryBudget).

    Every request deposits ``ratio`` of a token; every retry withdraws one. ``min_per_s``
    tokens per second trickle in regardless, so a quiet service can still retry. Under a
    failure storm the bucket empties and traffic to backends stays near 1 + ratio times
    the client's, instead of ``max_attempts`` times.
    """

    def __init__(
        self, ratio: float, min_per_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self._clock = clock
        # Room for a burst: ten seconds of the floor, or ten retries.
        self.capacity = max(10.0, 10.0 * min_per_s)
        self.tokens = self.capacity
        self._last = clock()

    def deposit(self) -> None:
        """A request arrived."""
        self.tokens = min(self.capacity, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        """Spend one retry; False when the budget is exhausted."""
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.min_per_s)
        self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
