"""Demand for each model and what the fleet has learned of its backends' speeds.

corral sees every request, so it knows better than any one Ollama which models are in use
where. This module keeps, per backend and model:

- requests in flight now, and their time average over ``window_s`` (an exponentially
  weighted level: a burst lifts it by its share of the window, a steady load sets it);
- when a request for the model last went there (a model used recently is *in demand*:
  evicting it costs whoever asks for it next a reload);
- the mean time a request holds a slot (dispatch to last byte);

per model, the requests queued for it now and their time average; and per backend, the load
speed (bytes per second, from Ollama's ``load_duration`` of the request that loaded a model)
and the prefill speed (prompt tokens per second, from ``prompt_eval_*``).

Every read is O(1); nothing here does I/O or knows about HTTP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from corral.fleet.backends import Clock

# Before anything is measured: a load moves this many bytes per second (a model file read
# from the page cache or a fast disk into VRAM), after a fixed start-up cost.
DEFAULT_LOAD_BPS = 2.0e9
LOAD_OVERHEAD_S = 0.5
# Before anything is measured: a request holds its slot this long.
DEFAULT_SERVICE_S = 5.0
DEFAULT_PREFILL_TPS = 2000.0
_EWMA = 0.2  # weight of a new observation in the means below


class Level:
    """The time average of a piecewise-constant level (requests in flight, queued) with an
    exponential window of ``tau`` seconds."""

    __slots__ = ("at", "level", "value")

    def __init__(self, now: float) -> None:
        self.value = 0.0
        self.level = 0
        self.at = now

    def read(self, now: float, tau: float) -> float:
        """The average as of ``now``."""
        dt = now - self.at
        if dt <= 0:
            return self.value
        return self.level + (self.value - self.level) * math.exp(-dt / tau)

    def add(self, now: float, tau: float, delta: int) -> None:
        """The level changes by ``delta`` at ``now``."""
        self.value = self.read(now, tau)
        self.at = now
        self.level += delta


@dataclass(slots=True)
class _Use:
    """One model on one backend."""

    in_flight: int
    avg: Level
    last: float
    service_s: float | None = None


class Demand:
    """Per backend and model: in flight, its average, recency, service time; speeds."""

    def __init__(self, *, window_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._uses: dict[tuple[str, str], _Use] = {}
        self._by_backend: dict[str, dict[str, _Use]] = {}
        self._counted: dict[str, int] = {}  # requests in flight per backend, all models
        self._queued: dict[str, int] = {}
        self._queued_avg: dict[str, Level] = {}
        self._model_service: dict[str, float] = {}
        self._load_bps: dict[str, float] = {}
        self._prefill_tps: dict[str, float] = {}

    # What happens -----------------------------------------------------------------------------

    def _use(self, backend_id: str, model: str, now: float) -> _Use:
        use = self._uses.get((backend_id, model))
        if use is None:
            use = _Use(0, Level(now), now)
            self._uses[(backend_id, model)] = use
            self._by_backend.setdefault(backend_id, {})[model] = use
        return use

    def start(self, backend_id: str, model: str) -> None:
        """A request for ``model`` began on ``backend_id``."""
        now = self._clock()
        use = self._use(backend_id, model, now)
        use.avg.add(now, self.window_s, 1)
        use.in_flight += 1
        use.last = now
        self._counted[backend_id] = self._counted.get(backend_id, 0) + 1

    def end(self, backend_id: str, model: str, held_s: float | None = None) -> None:
        """That request ended after holding its slot ``held_s`` seconds (None: failed)."""
        now = self._clock()
        use = self._use(backend_id, model, now)
        if use.in_flight > 0:
            use.avg.add(now, self.window_s, -1)
            use.in_flight -= 1
            self._counted[backend_id] -= 1
        use.last = now
        if held_s is not None and held_s >= 0:
            use.service_s = _mean(use.service_s, held_s)
            self._model_service[model] = _mean(self._model_service.get(model), held_s)

    def queue(self, model: str, delta: int) -> None:
        """``delta`` requests for ``model`` joined (+) or left (-) corral's queue."""
        now = self._clock()
        level = self._queued_avg.get(model)
        if level is None:
            level = self._queued_avg[model] = Level(now)
        level.add(now, self.window_s, delta)
        self._queued[model] = max(0, self._queued.get(model, 0) + delta)

    def observe_load(self, backend_id: str, size_bytes: int, seconds: float) -> None:
        """A model of ``size_bytes`` took ``seconds`` to load on ``backend_id``."""
        moving = seconds - LOAD_OVERHEAD_S
        if size_bytes <= 0 or moving <= 0:
            return
        self._load_bps[backend_id] = _mean(self._load_bps.get(backend_id), size_bytes / moving)

    def observe_prefill(self, backend_id: str, tokens: int, seconds: float) -> None:
        """``tokens`` prompt tokens were processed (not read from cache) in ``seconds``."""
        if tokens >= 32 and seconds > 0:
            tps = tokens / seconds
            self._prefill_tps[backend_id] = _mean(self._prefill_tps.get(backend_id), tps)

    def forget(self, backend_id: str) -> None:
        """A backend left the registry."""
        for model in self._by_backend.pop(backend_id, {}):
            self._uses.pop((backend_id, model), None)
        self._counted.pop(backend_id, None)
        self._load_bps.pop(backend_id, None)
        self._prefill_tps.pop(backend_id, None)

    # What is known ----------------------------------------------------------------------------

    def in_flight(self, backend_id: str, model: str) -> int:
        use = self._uses.get((backend_id, model))
        return use.in_flight if use else 0

    def counted(self, backend_id: str) -> int:
        """Requests in flight on ``backend_id`` that were counted for a model."""
        return self._counted.get(backend_id, 0)

    def busy(self, backend_id: str) -> dict[str, int]:
        """Models with requests in flight on ``backend_id`` now."""
        uses = self._by_backend.get(backend_id, {})
        return {m: u.in_flight for m, u in uses.items() if u.in_flight}

    def models_on(self, backend_id: str) -> list[str]:
        """Models corral has sent requests for to ``backend_id``."""
        return list(self._by_backend.get(backend_id, ()))

    def concurrency(self, backend_id: str, model: str) -> float:
        """Requests for ``model`` in flight on ``backend_id``, averaged over the window."""
        use = self._uses.get((backend_id, model))
        return use.avg.read(self._clock(), self.window_s) if use else 0.0

    def recency(self, backend_id: str, model: str) -> float:
        """1 while ``model`` is in use on ``backend_id``, decaying over the window after."""
        use = self._uses.get((backend_id, model))
        if use is None:
            return 0.0
        if use.in_flight:
            return 1.0
        return math.exp(-(self._clock() - use.last) / self.window_s)

    def in_demand(self, backend_id: str, model: str) -> bool:
        """In use there now, or used there within the last window."""
        use = self._uses.get((backend_id, model))
        if use is None:
            return False
        return use.in_flight > 0 or self._clock() - use.last < self.window_s

    def queued(self, model: str) -> int:
        return self._queued.get(model, 0)

    def queued_avg(self, model: str) -> float:
        level = self._queued_avg.get(model)
        return level.read(self._clock(), self.window_s) if level else 0.0

    def service_s(self, backend_id: str, model: str) -> float:
        """How long a request for ``model`` holds a slot on ``backend_id`` (best estimate)."""
        use = self._uses.get((backend_id, model))
        if use is not None and use.service_s is not None:
            return use.service_s
        return self._model_service.get(model, DEFAULT_SERVICE_S)

    def load_s(self, backend_id: str, size_bytes: int | None) -> float:
        """How long loading ``size_bytes`` takes on ``backend_id``."""
        bps = self._load_bps.get(backend_id)
        if bps is None:
            # Not measured there yet: the fleet's typical speed, not a guess that would make
            # every measured backend look cheaper than the untried ones.
            known = self._load_bps.values()
            bps = sum(known) / len(known) if known else DEFAULT_LOAD_BPS
        return LOAD_OVERHEAD_S + (size_bytes or 0) / bps

    def prefill_tps(self, backend_id: str) -> float:
        known = self._prefill_tps.values()
        typical = sum(known) / len(known) if known else DEFAULT_PREFILL_TPS
        return self._prefill_tps.get(backend_id, typical)


def _mean(old: float | None, new: float) -> float:
    return new if old is None else old + _EWMA * (new - old)
