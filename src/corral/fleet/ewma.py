"""Peak-EWMA of a latency, as in Finagle's and Linkerd's load balancers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class PeakEwma:
    """A latency estimate that jumps up at once and decays down slowly.

    ``observe(v)``: a value above the current estimate is adopted immediately (a backend
    that got slow is avoided right away); a lower one is blended in with
    ``w = exp(-dt / tau_s)``, ``estimate = estimate * w + v * (1 - w)``, where ``dt`` is the
    time since the previous observation — so recovery is gradual, and faster the longer the
    gap. The estimate changes only on ``observe``; it does not decay while idle.
    """

    __slots__ = ("_clock", "_last_at", "_tau_s", "_value")

    def __init__(self, tau_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not tau_s > 0:
            raise ValueError(f"tau_s must be > 0, got {tau_s!r}")
        self._tau_s = tau_s
        self._clock = clock
        self._value: float | None = None
        self._last_at = 0.0

    @property
    def value(self) -> float | None:
        """The current estimate in seconds; ``None`` before the first observation."""
        return self._value

    def observe(self, value_s: float) -> None:
        """Fold one measured latency (seconds, ≥ 0) into the estimate."""
        if not value_s >= 0:
            raise ValueError(f"latency must be a number ≥ 0, got {value_s!r}")
        now = self._clock()
        current = self._value
        if current is None or value_s > current:
            self._value = value_s
        else:
            dt = max(0.0, now - self._last_at)
            w = math.exp(-dt / self._tau_s)
            self._value = current * w + value_s * (1.0 - w)
        self._last_at = now

    def __repr__(self) -> str:
        return f"PeakEwma(tau_s={self._tau_s!r}, value={self._value!r})"
