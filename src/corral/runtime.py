"""Runtime: the live parts of one corral process, built from Settings."""

from __future__ import annotations

import asyncio

import structlog

from corral.admission import Admission
from corral.backends import BackendRegistry, BackendState
from corral.config import Settings
from corral.health import HealthChecker
from corral.lifecycle import Lifecycle
from corral.metrics import Metrics
from corral.proxy import Forwarder
from corral.routing import Router
from corral.systemd import sd_notify
from corral.upstream import Upstream

log = structlog.get_logger("corral")


class Runtime:
    """Registry, router, admission, forwarder, health checker and metrics, wired together."""

    def __init__(self, settings: Settings, *, upstream: Upstream | None = None) -> None:
        self.settings = settings
        self.admin_key = settings.resolved_admin_key()
        self.metrics = Metrics()
        self.registry = BackendRegistry(BackendState.from_settings(b) for b in settings.backends)
        self.upstream = upstream or Upstream(settings.timeouts)
        self.health = HealthChecker(self.registry, self.upstream, settings.health, self.metrics)
        self.router = Router(self.registry, settings.balancer)
        self.admission = Admission(self.router, settings.queue, self.metrics)
        self.forwarder = Forwarder(
            self.registry,
            self.admission,
            self.upstream,
            self.health,
            self.metrics,
            settings.balancer,
        )
        self.lifecycle = Lifecycle()
        self.draining = False
        self.metrics.set_strategy(self.router.strategy_name)
        self.registry.on_change(self._on_change)

    def _on_change(self, event: str, backend: BackendState | None) -> None:
        if event == "removed" and backend is not None:
            self.metrics.forget_backend(backend.id)
            log.info("backend removed", backend=backend.id)
        elif event == "added" and backend is not None:
            log.info("backend added", backend=backend.id, url=backend.url)

    def set_strategy(self, name: str) -> None:
        old = self.router.strategy_name
        self.router.set_strategy(name)
        self.metrics.set_strategy(name)
        log.info("strategy changed", old=old, new=name)

    def default_ttl(self, backend: BackendState) -> float:
        return max(3 * self.settings.health.interval_s, 30.0)

    async def start(self) -> None:
        """Probe every backend once (bounded), then keep probing in the background."""
        try:
            await asyncio.wait_for(self.health.probe_all(), self.settings.health.timeout_s + 1)
        except TimeoutError:
            log.warning("initial health probe did not finish in time")
        healthy = sum(b.healthy for b in self.registry.all())
        log.info(
            "corral started",
            backends=len(self.registry),
            healthy=healthy,
            strategy=self.router.strategy_name,
        )
        self.lifecycle.start("health", self.health.run())
        sd_notify("READY=1")

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting (queued and new requests get 503), wait for in-flight ones to end.

        Returns True when everything finished within ``grace_s``.
        """
        self.draining = True
        self.admission.close("corral is shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        idle = asyncio.Event()

        def check() -> None:
            if all(b.in_flight == 0 for b in self.registry.all()):
                idle.set()

        self.registry.on_capacity(check)
        check()
        remaining = deadline - loop.time()
        try:
            await asyncio.wait_for(idle.wait(), max(remaining, 0))
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        await self.lifecycle.stop()
        await self.upstream.close()
        log.info("corral stopped")
