"""Choosing a backend: filters, then hot-model affinity, then the strategy."""

from __future__ import annotations

import time
from collections.abc import Collection

from corral.backends import BackendRegistry, BackendState, Clock
from corral.config import BalancerSettings
from corral.errors import ModelNotFoundError, NoBackendError
from corral.strategies import RequestInfo, Strategy, create_strategy, weight_for_vram

# A resident backend keeps the request unless it is this much busier (in slot fractions)
# than the least loaded eligible one: a cold load costs seconds, a short wait less.
AFFINITY_SLACK = 0.5


class Router:
    """Applies the filters of PRODUCT.md "Choosing a backend" and asks the strategy."""

    def __init__(
        self,
        registry: BackendRegistry,
        settings: BalancerSettings,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._clock = clock
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
        self, model: str, model_key: str | None, route: str, exclude: Collection[str] = ()
    ) -> BackendState | None:
        """A backend with a free slot, or None when every eligible backend is full.

        Raises ModelNotFoundError / NoBackendError as :meth:`eligible` does.
        """
        free = self.free(model, model_key, exclude)
        if not free:
            return None
        if model_key is not None and len(free) > 1:
            if self.settings.model_affinity:
                free = self._prefer_resident(free, model_key)
            free = self._prefer_room(free, model_key)
        if len(free) == 1:
            return free[0]
        by_id = {b.id: b for b in free}
        chosen = self.strategy.select(
            [b.candidate(self.weight_of(b)) for b in free], RequestInfo(model=model, route=route)
        )
        return by_id[chosen.id]

    @staticmethod
    def _prefer_room(free: list[BackendState], model_key: str) -> list[BackendState]:
        """A GPU with free memory for a model not loaded there beats one that would evict."""
        room = [b for b in free if b.has_room(model_key)]
        return room if room else free

    @staticmethod
    def _prefer_resident(free: list[BackendState], model_key: str) -> list[BackendState]:
        resident = [b for b in free if model_key in b.resident]
        if not resident or len(resident) == len(free):
            return free

        def load(b: BackendState) -> float:
            return b.in_flight / b.max_concurrent

        if min(map(load, resident)) - min(map(load, free)) <= AFFINITY_SLACK:
            return resident
        return free
