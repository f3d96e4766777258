"""Demand-driven placement: copies of the models in demand, loaded ahead of the requests.

The router decides one request at a time. This loop looks at the fleet every
``placement.demand_interval_s``: a model whose demand over the window exceeded what its
holders serve (``Costs.needs_copy``), or a model asked for recently that no backend
holds any more, is loaded on a backend that is not loading already (Ollama serves its loaded
models while it loads another) where that evicts nothing in demand, waits for no busy model
and does not spill to the CPU; of those, where it costs least (big models to big GPUs, quiet
backends first). Where the load needs room, corral unloads the model it chose (the one used
least recently there) first, instead of leaving the choice to Ollama. One load per pass, so
the fleet changes step by step and each step is seen by the next.

Each change is logged and counted in ``corral_placement_actions_total`` (``preload`` or
``evict``, reason ``demand``). Priority models (the placement manager's) are never evicted;
a model the admin unloaded or moved to the CPU gets no copy for ten minutes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from corral.balancer.costs import LoadCost, holding
from corral.balancer.routing import Router, rank
from corral.config import PlacementSettings
from corral.errors import PlacementError
from corral.fleet import inventory
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model
from corral.fleet.placement import Send, name_on, post_load
from corral.metrics import Metrics

log = structlog.get_logger("corral.placement")

Refresh = Callable[[BackendState], Awaitable[Any]]
# After an admin unloads a model (or moves it to the CPU), no copy of it is loaded for this long.
PAUSE_S = 600.0


class Replicator:
    """Loads copies of in-demand models where they cost least, one per pass."""

    def __init__(
        self,
        registry: BackendRegistry,
        router: Router,
        settings: PlacementSettings,
        metrics: Metrics,
        *,
        send: Send,
        refresh: Refresh,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.router = router
        self.settings = settings
        self.metrics = metrics
        self._send = send
        self._refresh = refresh
        self._clock = clock
        self._keep = {normalize_model(m) for m in settings.priority_models}
        self._paused: dict[str, float] = {}

    def pause(self, model: str, seconds: float = PAUSE_S) -> None:
        """Load no copy of ``model`` for ``seconds`` (an admin unloaded it or moved it to CPU)."""
        self._paused[normalize_model(model)] = self._clock() + seconds

    async def run(self) -> None:
        """A pass every ``demand_interval_s``; errors are logged and counted, never fatal."""
        while True:
            await asyncio.sleep(self.settings.demand_interval_s)
            try:
                await self.run_pass()
            except PlacementError as exc:
                log.warning("demand placement failed", error=str(exc))
            except Exception:
                log.exception("demand placement pass failed")
                self._count("error", "")

    def plan(self) -> tuple[str, LoadCost] | None:
        """The one copy worth loading now: (model, where and what it evicts), or None."""
        now = self._clock()
        up = [b for b in self.registry.all() if b.available(now) and not b.fallback]
        demand = self.router.demand
        wanted: set[str] = set()
        for b in up:
            wanted.update(m for m in demand.models_on(b.id) if demand.in_demand(b.id, m))
        best: tuple[tuple[Any, ...], str, LoadCost] | None = None
        for model in sorted(wanted):
            if self._paused.get(model, 0.0) > now:
                continue
            holders = [b for b in up if holding(b, model, None) in ("gpu", "loading")]
            if holders and not self.router.costs.needs_copy(holders, model):
                continue
            size = self.router.model_size(model)
            # Ollama loads one model at a time and serves its loaded models meanwhile: any
            # backend not loading already will do.
            targets = [
                b
                for b in up
                if b not in holders and model in b.models and b.fits(model) and not b.loading
            ]
            for b in targets:
                cost = self.router.costs.load(
                    b, model, size, now, b.max_loaded_models, steered=True
                )
                if cost.evicts_in_demand or cost.blocked or cost.partial:
                    continue
                if any(v in self._keep for v in cost.evicts):
                    continue
                # A model held nowhere first, then the one queued for most, then the cheapest.
                key = (bool(holders), -demand.queued_avg(model), *rank(cost))
                if best is None or key < best[0]:
                    best = (key, model, cost)
        return None if best is None else (best[1], best[2])

    async def run_pass(self) -> tuple[str, str] | None:
        """Load the planned copy (after unloading what it evicts); (model, backend) or None."""
        found = self.plan()
        if found is None:
            return None
        model, cost = found
        b = cost.backend
        for victim in cost.evicts:
            await self._post(b, victim, {"keep_alive": 0})
            self._changed("evict", victim, b, f"room for {model}, in demand")
        inventory.mark_loading(b, model, self._clock())
        self.registry.notify()  # requests queued for the model may go to the new copy now
        try:
            await self._post(b, model, {})
        finally:
            await self._refresh(b)
        self._changed("preload", model, b, "demand exceeded what its holders serve")
        return model, b.id

    async def _post(self, b: BackendState, model: str, extra: dict[str, Any]) -> None:
        body = {"model": name_on(b, model, model), "prompt": "", "stream": False, **extra}
        try:
            await post_load(self._send, b, body)
        except PlacementError:
            self._count("error", b.id)
            raise

    def _changed(self, action: str, model: str, b: BackendState, reason: str) -> None:
        log.info("placement", action=action, model=model, backend=b.id, reason=reason)
        self._count(action, b.id)

    def _count(self, action: str, backend: str) -> None:
        self.metrics.placement_actions.labels(action=action, backend=backend).inc()
