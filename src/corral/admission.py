"""Admission: wait for a free slot when every eligible backend is full."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Collection

from corral.backends import BackendState, Clock
from corral.config import QueueSettings
from corral.errors import NoBackendError
from corral.metrics import Metrics
from corral.routing import Router


class Admission:
    """Hands out backends with a free slot; queues (bounded, with a deadline) when all are full."""

    def __init__(
        self,
        router: Router,
        settings: QueueSettings,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.router = router
        self.settings = settings
        self.metrics = metrics
        self._clock = clock
        self.queued = 0

    async def acquire(
        self, model: str, model_key: str | None, route: str, exclude: Collection[str] = ()
    ) -> BackendState:
        """A backend with a free slot. The caller leases it before awaiting anything else."""
        registry = self.router.registry
        changed = registry.changed
        backend = self.router.pick(model, model_key, route, exclude)
        if backend is not None:
            return backend
        if self.queued >= self.settings.max_size:
            raise NoBackendError("all backends are busy and the queue is full", self._retry_after())
        started = self._clock()
        deadline = started + self.settings.timeout_s
        self.queued += 1
        gauge = self.metrics.queue_depth.labels(priority="normal")
        gauge.inc()
        try:
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise NoBackendError(
                        f"all backends are busy (waited {self.settings.timeout_s:g}s in queue)",
                        self._retry_after(),
                    )
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    continue
                changed = registry.changed
                backend = self.router.pick(model, model_key, route, exclude)
                if backend is not None:
                    return backend
        finally:
            self.queued -= 1
            gauge.dec()
            self.metrics.queue_wait.observe(self._clock() - started)

    def _retry_after(self) -> int:
        return max(1, math.ceil(min(self.settings.timeout_s, 30) / 4))
