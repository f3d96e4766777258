"""Choosing a backend: filters, then hot-model affinity, then the strategy."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from corral import inventory
from corral.backends import BackendRegistry, BackendState, Clock
from corral.config import BalancerSettings
from corral.errors import ModelNotFoundError, NoBackendError
from corral.metrics import Metrics
from corral.sessions import SessionMap
from corral.strategies import RequestInfo, Strategy, create_strategy, weight_for_vram


class Router:
    """Applies the filters of PRODUCT.md "Choosing a backend" and asks the strategy."""

    def __init__(
        self,
        registry: BackendRegistry,
        settings: BalancerSettings,
        *,
        clock: Clock = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._clock = clock
        self.metrics = metrics
        self._cold_loads = metrics.cold_loads if metrics else None
        self._cold_avoided = metrics.cold_loads_avoided if metrics else None
        self._sessions = SessionMap(clock=clock)
        self.strategy: Strategy = create_strategy(
            settings.strategy, score_weights=settings.score_weights
        )

    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    def set_strategy(self, name: str) -> Strategy:
        """Swap the strategy; in-flight requests are unaffected (they hold their backend)."""
        self.strategy = create_strategy(name, score_weights=self.settings.score_weights)
        return self.strategy

    def weight_of(self, backend: BackendState) -> float:
        if backend.weight is not None:
            return backend.weight
        return weight_for_vram(backend.vram_total_bytes)

    def eligible(self, model_key: str | None, exclude: Collection[str] = ()) -> list[BackendState]:
        """Backends that may serve ``model_key`` now, ignoring free slots.

        Raises ModelNotFoundError when no known backend lists the model and
        NoBackendError when some do but none is available.
        """
        now = self._clock()
        backends = self.registry.all()
        up = [b for b in backends if b.available(now) and b.id not in exclude]
        if model_key is None:
            if not up:
                raise NoBackendError("no healthy backend available")
            return up
        with_model = [b for b in up if model_key in b.models]
        if with_model:
            # Big models to big GPUs: skip a GPU too small for the model if another can hold it.
            fits = [b for b in with_model if b.fits(model_key)]
            return fits if fits else with_model
        if any(model_key in b.models for b in backends):
            raise NoBackendError(f"no healthy backend has model '{model_key}'")
        if not up and not exclude:
            raise NoBackendError("no healthy backend available")
        return []

    def free(
        self, model: str, model_key: str | None, exclude: Collection[str] = ()
    ) -> list[BackendState]:
        """The backends :meth:`pick` would choose among now (empty: wait). No strategy call.

        Raises ModelNotFoundError / NoBackendError as :meth:`eligible` does.
        """
        eligible = self.eligible(model_key, exclude)
        if not eligible:
            raise ModelNotFoundError(model)
        # A hot GPU is avoided while a cool one can serve (it may be full: then wait for it).
        cool = [b for b in eligible if not b.gpu_hot]
        if cool:
            eligible = cool
        free = [b for b in eligible if b.in_flight < b.max_concurrent]
        primary = [b for b in free if not b.fallback]
        # A fallback (a CPU-only Ollama) serves only when no GPU backend can: all down or full.
        return primary or free

    def pick(
        self,
        model: str,
        model_key: str | None,
        route: str,
        exclude: Collection[str] = (),
        session: str | None = None,
    ) -> BackendState | None:
        """A backend with a free slot, or None when every eligible backend is full.

        Raises ModelNotFoundError / NoBackendError as :meth:`eligible` does.
        """
        free = self.free(model, model_key, exclude)
        if not free:
            return None
        loads_model = model_key is not None and route != "show"
        chosen = self._choose(free, model, model_key, route, session if loads_model else None)
        if loads_model:
            assert model_key is not None
            self._note(chosen, free, model_key, session)
        return chosen

    def _choose(
        self,
        free: list[BackendState],
        model: str,
        model_key: str | None,
        route: str,
        session: str | None,
    ) -> BackendState:
        if len(free) == 1:
            return free[0]
        # The least loaded eligible backend's load (in-flight share), computed once per pick.
        least = min(b.in_flight / b.max_concurrent for b in free)
        if session is not None and self.settings.session_affinity:
            held = self._sessions.get(session)
            backend = next((b for b in free if b.id == held), None)
            if backend is not None and not self._spills(backend, least):
                return backend
        if model_key is not None and route != "show":
            if self.settings.model_affinity:
                free = self._affine(free, model_key, least)
            else:
                free = self._prefer_room(free, model_key)
        if len(free) == 1:
            return free[0]
        by_id = {b.id: b for b in free}
        chosen = self.strategy.select(
            [b.candidate(self.weight_of(b)) for b in free], RequestInfo(model=model, route=route)
        )
        return by_id[chosen.id]

    def _spills(self, backend: BackendState, least: float) -> bool:
        """``backend`` is too much busier than the least loaded one to keep its affinity."""
        load = backend.in_flight / backend.max_concurrent
        excess = (load - least) * backend.max_concurrent  # in the backend's own requests
        return (
            excess > self.settings.affinity_spill_abs
            and load > least * self.settings.affinity_spill_ratio
        )

    def _affine(self, free: list[BackendState], model_key: str, least: float) -> list[BackendState]:
        """Hot-model affinity with bounded load, then VRAM-aware placement of a cold model."""
        on_gpu: list[BackendState] = []
        partial: list[BackendState] = []
        for b in free:
            if model_key in b.loading:
                on_gpu.append(b)
            elif model_key in b.resident:
                where = inventory.where(b, model_key)
                if where == "gpu":
                    on_gpu.append(b)
                elif where == "partial":
                    partial.append(b)
        for tier in (on_gpu, partial):
            kept = [b for b in tier if not self._spills(b, least)]
            if kept:
                return kept
        if not on_gpu and not partial:
            return self._roomiest(free, model_key, least)
        # On a GPU but too busy there: a second copy elsewhere is worth its load, unless it
        # would evict another model; then the holders keep it while they have a free slot.
        holding = {b.id for b in on_gpu} | {b.id for b in partial}
        others = [b for b in free if b.id not in holding and b.has_room(model_key)]
        return self._roomiest(others, model_key, least) if others else on_gpu + partial

    def _roomiest(
        self, free: list[BackendState], model_key: str, least: float
    ) -> list[BackendState]:
        """A model loaded nowhere: the GPU with the most free memory for it (bounded load)."""
        room = self._prefer_room(free, model_key)
        known = [b for b in room if b.vram_free_bytes is not None and not self._spills(b, least)]
        if len(known) < len(room):
            return room  # some GPUs unknown: no basis to rank them
        most = max(b.vram_free_bytes or 0 for b in known)
        return [b for b in known if b.vram_free_bytes == most]

    @staticmethod
    def _prefer_room(free: list[BackendState], model_key: str) -> list[BackendState]:
        """A GPU with free memory for a model not loaded there beats one that would evict."""
        room = [b for b in free if b.has_room(model_key)]
        return room if room else free

    def _note(
        self,
        chosen: BackendState,
        free: list[BackendState],
        model_key: str,
        session: str | None,
    ) -> None:
        """Count a cold load performed or avoided; remember the conversation's backend."""
        if model_key in chosen.resident or model_key in chosen.loading:
            if any(model_key not in b.resident and model_key not in b.loading for b in free):
                self._count(self._cold_avoided, chosen.id)
        else:
            inventory.mark_loading(chosen, model_key, self._clock())
            self._count(self._cold_loads, chosen.id)
        if session is not None and self.settings.session_affinity:
            self._sessions.put(session, chosen.id)

    def _count(self, metric: Any, backend_id: str) -> None:
        if self.metrics is not None:
            self.metrics.child(metric, backend_id).inc()
