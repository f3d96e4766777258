"""Choosing a backend: filters, then hot-model affinity, then the strategy."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from corral.balancer.costs import Costs, LoadCost, holding
from corral.balancer.demand import Demand
from corral.balancer.sessions import SessionMap
from corral.config import BalancerSettings
from corral.errors import ModelNotFoundError, NoBackendError
from corral.fleet import inventory
from corral.fleet.backends import BackendRegistry, BackendState, Clock
from corral.metrics import Metrics
from corral.strategies import RequestInfo, Strategy, create_strategy, weight_for_vram

# A new copy of a model is loaded on a burst alone only when waiting for a holder is expected
# to take this many times longer than the load.
COPY_ON_WAIT = 3.0


def rank(option: LoadCost) -> tuple[bool, float, int]:
    """Among backends that could load a model: no CPU offload, then the least cost (to 0.1 s),
    then the most free memory (big models to big GPUs)."""
    return (option.partial, round(option.total_s, 1), -(option.backend.vram_free_bytes or 0))


def demand_key(model_key: str | None, route: str) -> str | None:
    """The model a request occupies a runner of (none for /api/show: it loads nothing)."""
    return model_key if route != "show" else None


def backend_cap(b: BackendState) -> int:
    """Requests an Ollama runs at once: ``max_concurrent`` (its OLLAMA_NUM_PARALLEL) for each
    model it may hold loaded."""
    models = b.max_loaded_models or max(1, len(b.resident) + 1)
    return b.max_concurrent * models


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
        self._reloads = metrics.context_reloads if metrics else None
        self._reloads_avoided = metrics.context_reloads_avoided if metrics else None
        self.demand = Demand(window_s=settings.demand_window_s, clock=clock)
        self.costs = Costs(self.demand)
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
        up = [
            b
            for b in backends
            if b.healthy and not b.draining and b.ejected_until <= now and b.id not in exclude
        ]  # BackendState.available, inlined: this runs for every request
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

    def open_slots(
        self, model: str, model_key: str | None, exclude: Collection[str] = ()
    ) -> tuple[list[BackendState], list[BackendState]]:
        """(eligible, those with a free slot that may take the request), before any model
        preference. Raises as :meth:`eligible` does; ModelNotFoundError when none is left."""
        eligible = self.eligible(model_key, exclude)
        if not eligible:
            if model_key in self.registry.coming:
                return [], []  # a fleet-wide pull brings it: wait for it
            raise ModelNotFoundError(model)
        # A hot GPU is avoided while a cool one can serve (it may be full: then wait for it).
        cool = [b for b in eligible if not b.gpu_hot]
        if cool:
            eligible = cool
        free = [b for b in eligible if self.has_slot(b, model_key)]
        primary = [b for b in free if not b.fallback]
        # A fallback (a CPU-only Ollama) serves only when no GPU backend can: all down or full.
        return eligible, primary or free

    def has_slot(self, b: BackendState, model_key: str | None) -> bool:
        """Ollama runs OLLAMA_NUM_PARALLEL (``max_concurrent``) requests per loaded model: a
        slot is free for ``model_key`` while its requests there are fewer (requests not
        counted for a model, such as ``/api/show``, count against every model)."""
        in_flight = b.in_flight + b.elsewhere  # fleet-wide (elsewhere: other replicas)
        if not in_flight:
            return True
        if in_flight >= backend_cap(b):
            return False
        # Other replicas' requests are not counted per model here: they count against every
        # model (conservative), as uncounted local ones do.
        uncounted = max(0, in_flight - self.demand.counted(b.id))
        mine = self.demand.in_flight(b.id, model_key) if model_key is not None else 0
        return mine + uncounted < b.max_concurrent

    def free(
        self,
        model: str,
        model_key: str | None,
        exclude: Collection[str] = (),
        route: str = "",
        num_ctx: int | None = None,
        session: str | None = None,
    ) -> list[BackendState]:
        """The backends :meth:`pick` would choose among now (empty: wait). No strategy call.

        With model affinity, a request waits for a backend holding its model rather than
        start a cold load that costs more than the wait (see corral.balancer.costs), and a
        conversation's turn waits for the backend holding its prompt when that is quicker
        than computing the prompt again elsewhere.
        Raises ModelNotFoundError / NoBackendError as :meth:`eligible` does.
        """
        eligible, free = self.open_slots(model, model_key, exclude)
        if not free or model_key is None or route == "show" or free[0].fallback:
            return free  # (only fallbacks are free when every GPU backend is down or full)
        if not self.settings.model_affinity:
            return self._prefer_room(free, model_key)
        if session is not None and self._waits_for_its_cache(session, eligible, free, model_key):
            return []
        return self._affine(eligible, free, model_key, num_ctx)

    def _waits_for_its_cache(
        self,
        session: str,
        eligible: list[BackendState],
        free: list[BackendState],
        model_key: str,
    ) -> bool:
        """The conversation's backend holds its prompt but has no slot now: wait for it when
        its next free slot is expected sooner than the prompt would take to compute again on
        another backend holding the model."""
        if not self.settings.session_affinity or not (tokens := self._sessions.tokens(session)):
            return False
        held = self._sessions.get(session)
        home = next((b for b in eligible if b.id == held), None)
        if home is None or home in free or holding(home, model_key, None) != "gpu":
            return False
        others = [b for b in free if holding(b, model_key, None) == "gpu"]
        if not others:
            return False  # the other choice is a load, weighed by _affine
        now = self._clock()
        prefill_s = min(tokens / self.demand.prefill_tps(b.id) for b in others)
        return self.costs.holder_wait_s([home], model_key, now) < prefill_s

    def note_context(self, session: str, tokens: int, backend_id: str | None = None) -> None:
        """A conversation's answer left ``tokens`` (prompt and answer, 0: unknown) in the
        cache of ``backend_id`` (None: the backend it was placed on): its next turn goes there."""
        if not self.settings.session_affinity:
            return
        if backend_id is not None and self._sessions.get(session) != backend_id:
            self._sessions.put(session, backend_id)
        if tokens:
            self._sessions.note_tokens(session, tokens)

    def pick(
        self,
        model: str,
        model_key: str | None,
        route: str,
        exclude: Collection[str] = (),
        session: str | None = None,
        num_ctx: int | None = None,
    ) -> BackendState | None:
        """A backend with a free slot, or None when the request should wait.

        Raises ModelNotFoundError / NoBackendError as :meth:`eligible` does.
        """
        free = self.free(model, model_key, exclude, route, num_ctx, session)
        if not free:
            return None
        loads_model = model_key is not None and route != "show"
        chosen = self._choose(free, model, route, session if loads_model else None)
        if loads_model:
            assert model_key is not None
            self._note(chosen, model_key, session, num_ctx, exclude)
        return chosen

    def _choose(
        self, free: list[BackendState], model: str, route: str, session: str | None
    ) -> BackendState:
        if len(free) == 1:
            return free[0]
        if session is not None and self.settings.session_affinity:
            held = self._sessions.get(session)
            backend = next((b for b in free if b.id == held), None)
            if backend is not None:
                # The conversation's prompt is cached there: keep it unless that backend is
                # far busier than the others it could go to.
                least = min((b.in_flight + b.elsewhere) / b.max_concurrent for b in free)
                if not self._spills(backend, least):
                    return backend
        by_id = {b.id: b for b in free}
        chosen = self.strategy.select(
            [b.candidate(self.weight_of(b)) for b in free], RequestInfo(model=model, route=route)
        )
        return by_id[chosen.id]

    def _spills(self, backend: BackendState, least: float) -> bool:
        """``backend`` is too much busier than the least loaded one to keep its affinity."""
        load = (backend.in_flight + backend.elsewhere) / backend.max_concurrent
        excess = (load - least) * backend.max_concurrent  # in the backend's own requests
        return (
            excess > self.settings.affinity_spill_abs
            and load > least * self.settings.affinity_spill_ratio
        )

    def _affine(
        self,
        eligible: list[BackendState],
        free: list[BackendState],
        model_key: str,
        num_ctx: int | None,
    ) -> list[BackendState]:
        """Hot-model affinity: a free backend holding the model; else wait for one, unless a
        new copy is worth its cost; a model held nowhere goes where loading it costs least."""
        now = self._clock()
        free_ids = {b.id for b in free}
        on_gpu: list[BackendState] = []
        partial: list[BackendState] = []
        for b in eligible:
            held = holding(b, model_key, num_ctx)
            if held in ("gpu", "loading"):
                on_gpu.append(b)
            elif held == "partial":
                partial.append(b)
        for tier in (on_gpu, partial):
            open_ = [b for b in tier if b.id in free_ids]
            if not open_:
                continue
            # A copy still loading serves nothing until its load ends: a loaded holder with a
            # slot goes first, and a loading one only if it is ready before a loaded one frees.
            if not any(model_key in b.loading for b in open_):
                ready = open_  # every open holder has it loaded (the common case)
            else:
                left = {b.id: self.costs.load_left_s(b, model_key, now) for b in open_}
                ready = [b for b in open_ if left[b.id] <= 0]
            if not ready:
                loaded = [b for b in tier if self.costs.load_left_s(b, model_key, now) <= 0]
                soonest = min(left.values())
                if loaded and soonest > self.costs.holder_wait_s(loaded, model_key, now):
                    return []
                ready = [b for b in open_ if left[b.id] == soonest]
            least = min((b.in_flight + b.elsewhere) / b.max_concurrent for b in ready)
            return [b for b in ready if not self._spills(b, least)]
        holders = on_gpu or partial
        others = [b for b in free if b not in holders]
        if not others:
            return []  # wait for a holder (or any backend) to free a slot
        size = self.model_size(model_key)
        options = [self.costs.load(b, model_key, size, now, b.max_loaded_models) for b in others]
        if holders:
            # Every holder is full. A second copy only where it evicts nothing in demand and
            # waits for nothing busy, when waiting would cost more, and only once demand has
            # exceeded what the holders serve over the window (or the wait is far longer than
            # the load): not on one burst.
            copies = [o for o in options if not (o.evicts_in_demand or o.blocked or o.partial)]
            if not copies:
                return []
            best = min(copies, key=lambda o: o.total_s)
            wait = self.costs.holder_wait_s(holders, model_key, now)
            if wait <= best.total_s:
                return []
            if not (
                wait > COPY_ON_WAIT * best.total_s or self.costs.needs_copy(holders, model_key)
            ):
                return []
            return [best.backend]
        # Held nowhere: where the load costs least; a backend that is full now but would
        # cost less after its next free slot is worth waiting for.
        busy_options = [
            self.costs.load(b, model_key, size, now, b.max_loaded_models)
            for b in eligible
            if b.id not in free_ids and not b.fallback
        ]
        best = min(options, key=rank)
        if busy_options:
            later = min(busy_options, key=rank)
            slot_wait = self.demand.service_s(later.backend.id, model_key) / (
                later.backend.max_concurrent
            )
            if rank(later)[:1] <= rank(best)[:1] and (
                later.total_s + slot_wait < best.total_s / COPY_ON_WAIT
            ):
                return []
        return [o.backend for o in options if rank(o) == rank(best)]

    def model_size(self, model_key: str) -> int | None:
        """The model's footprint: its /api/ps size where it is loaded, else its file size."""
        size: int | None = None
        for b in self.registry.all():
            entry = b.resident.get(model_key)
            found = entry.get("size") if entry else None
            if isinstance(found, int) and found > 0:
                return found
            size = size or b.model_sizes.get(model_key)
        return size

    @staticmethod
    def _prefer_room(free: list[BackendState], model_key: str) -> list[BackendState]:
        """A GPU with free memory for a model not loaded there beats one that would evict."""
        room = [b for b in free if b.has_room(model_key)]
        return room if room else free

    def _note(
        self,
        chosen: BackendState,
        model_key: str,
        session: str | None,
        num_ctx: int | None,
        exclude: Collection[str],
    ) -> None:
        """Count a cold load or context reload performed or avoided; remember the
        conversation's backend."""
        now = self._clock()
        held = holding(chosen, model_key, num_ctx)
        others = [b for b in self.registry.all() if b is not chosen and b.id not in exclude]
        if held in ("gpu", "partial", "cpu", "loading"):
            if any(model_key not in b.resident and model_key not in b.loading for b in others):
                self._count(self._cold_avoided, chosen.id)
            if num_ctx is not None and any(
                holding(b, model_key, num_ctx) == "other_ctx" for b in others
            ):
                self._count(self._reloads_avoided, chosen.id)
        else:
            if held == "other_ctx":
                self._count(self._reloads, chosen.id)
                chosen.loading[model_key] = now
            else:
                inventory.mark_loading(chosen, model_key, now)
                self._count(self._cold_loads, chosen.id)
            if num_ctx is not None:
                chosen.loaded_ctx[model_key] = num_ctx
            else:
                chosen.loaded_ctx.pop(model_key, None)
        if session is not None and self.settings.session_affinity:
            self._sessions.put(session, chosen.id)

    def _count(self, metric: Any, backend_id: str) -> None:
        if self.metrics is not None:
            self.metrics.child(metric, backend_id).inc()
