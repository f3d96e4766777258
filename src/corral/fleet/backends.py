"""Backends, their live state, and the registry that owns them."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from corral.config import BackendSettings
from corral.errors import DuplicateBackendError, UnknownBackendError
from corral.fleet.ewma import PeakEwma

Clock = Callable[[], float]


def normalize_model(name: str) -> str:
    """Ollama's matching key: lower-case, ``:latest`` when no tag is given; ``name:tag:local``
    is the local ``name:tag`` (Ollama strips that suffix)."""
    name = name.strip().lower()
    last = name.rsplit("/", 1)[-1]
    if last.count(":") >= 2 and last.endswith(":local"):
        name, last = name[: -len(":local")], last[: -len(":local")]
    if ":" not in last:
        name += ":latest"
    return name


# No Ollama model name is longer (its parts are capped at 350 + 80 + 80 + 80 characters).
MAX_MODEL_NAME = 600


def shown_name(name: str) -> str:
    """``name`` as logs and error bodies show it: a name no model can have (too long) is cut,
    so a 2 MB name is neither logged nor echoed whole."""
    return name if len(name) <= MAX_MODEL_NAME else name[:100] + "…"


def is_cloud(name: str) -> bool:
    """Ollama's cloud models: ``name:cloud``, ``name:tag:cloud``, ``name:tag-cloud`` (the
    backend passes them to ollama.com: no local GPU, no VRAM)."""
    last = name.strip().lower().rsplit("/", 1)[-1]
    return last.endswith(":cloud") or (":" in last and last.endswith("-cloud"))


class Candidate(NamedTuple):
    """What a strategy may know about one eligible backend, frozen at decision time.

    A NamedTuple, not a frozen dataclass: one is built per eligible backend on every pick,
    and a tuple is several times cheaper to build.
    """

    id: str
    weight: float = 1.0
    in_flight: int = 0
    max_concurrent: int = 4
    total_requests: int = 0
    # Peak-EWMA of time to first token in seconds; None while the backend is untried.
    ewma_ttft_s: float | None = None
    # 0..1 over the recent window; 1.0 when nothing is known yet.
    success_rate: float = 1.0
    # 0..1: fraction of recent health probes that succeeded.
    availability: float = 1.0


@dataclass
class BackendState:
    """One Ollama instance (one GPU) and everything corral has learned about it."""

    id: str
    url: str
    max_concurrent: int = 4
    max_loaded_models: int = 3  # the Ollama's OLLAMA_MAX_LOADED_MODELS (0: no limit)
    weight: float | None = None
    gpu: int | str | list[int | str] | None = None
    gpu_metrics_url: str | None = None
    fallback: bool = False
    registered: bool = False  # added through the admin API (kept in the state file)
    ttl_s: float | None = None  # dynamic: leaves rotation without a heartbeat for this long
    expires_at: float | None = None  # monotonic deadline for dynamic backends
    expired: bool = False

    healthy: bool = False
    probed: bool = False
    draining: bool = False
    ejected_until: float = 0.0
    ejections: int = 0
    ejected_at: float = 0.0
    ejected_for_transport: bool = False  # unreachable, not misbehaving: a good probe lifts it
    consecutive_probe_failures: int = 0
    consecutive_probe_successes: int = 0
    consecutive_errors: int = 0
    version: str | None = None

    in_flight: int = 0  # this replica's requests on it
    # Requests other corral replicas run on it ([cluster], as last heard; 0 without one).
    # Routing weighs ``in_flight + elsewhere``; draining and removal wait for ``in_flight``.
    elsewhere: int = 0
    total_requests: int = 0
    total_failures: int = 0
    last_response_time: float | None = None
    avg_response_time: float | None = None
    last_used: float | None = None  # wall clock
    models: set[str] = field(default_factory=set)
    model_names: list[str] = field(default_factory=list)  # as the backend spells them
    resident: dict[str, dict[str, Any]] = field(default_factory=dict)  # from /api/ps
    model_sizes: dict[str, int] = field(default_factory=dict)  # bytes, from /api/tags
    loading: dict[str, float] = field(default_factory=dict)  # model -> since (monotonic)
    # The num_ctx of the request that made corral load a model here (Ollama may cap it, so
    # /api/ps can show less than was asked).
    loaded_ctx: dict[str, int] = field(default_factory=dict)
    # Kept current by the GPU poller (None: unknown, and routing does not guess).
    gpu_hot: bool = False
    vram_total_bytes: int | None = None
    vram_free_bytes: int | None = None
    ttft: PeakEwma = field(default_factory=PeakEwma)
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    bad_outcomes: int = 0  # failures among ``outcomes``, kept so reading it is O(1)
    probe_history: deque[bool] = field(default_factory=lambda: deque(maxlen=20))

    @classmethod
    def from_settings(
        cls, cfg: BackendSettings, *, registered: bool = False, ttl_s: float | None = None
    ) -> BackendState:
        """A backend from the config, or ``registered`` at runtime (admin API, state file),
        then kept only while heartbeats come within ``ttl_s`` when one is given."""
        return cls(
            id=cfg.id,
            url=cfg.url,
            max_concurrent=cfg.max_concurrent,
            max_loaded_models=cfg.max_loaded_models,
            weight=cfg.weight,
            gpu=cfg.gpu,
            gpu_metrics_url=cfg.gpu_metrics_url,
            fallback=cfg.fallback,
            registered=registered,
            ttl_s=ttl_s,
            expires_at=time.monotonic() + ttl_s if ttl_s else None,
        )

    @property
    def dynamic(self) -> bool:
        return self.ttl_s is not None

    def record(self) -> dict[str, Any]:
        """What the state file keeps of a registered backend."""
        return {
            "id": self.id,
            "url": self.url,
            "max_concurrent": self.max_concurrent,
            "max_loaded_models": self.max_loaded_models,
            "weight": self.weight,
            "gpu": self.gpu,
            "gpu_metrics_url": self.gpu_metrics_url,
            "fallback": self.fallback,
            "ttl_s": self.ttl_s,
        }

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def available(self, now: float) -> bool:
        """Takes new requests: healthy, not draining, not ejected."""
        return self.healthy and not self.draining and self.ejected_until <= now

    def add_outcome(self, at: float, ok: bool, keep: int = 1000) -> None:
        """Remember one request outcome (the last ``keep`` are kept)."""
        self.outcomes.append((at, ok))
        self.bad_outcomes += not ok
        if len(self.outcomes) > keep:
            _, old_ok = self.outcomes.popleft()
            self.bad_outcomes -= not old_ok

    def clear_outcomes(self) -> None:
        self.outcomes.clear()
        self.bad_outcomes = 0

    def has_model(self, key: str) -> bool:
        return key in self.models

    def fits(self, model_key: str) -> bool:
        """The model is no bigger than this backend's GPU memory (True when either is unknown)."""
        size = self.model_sizes.get(model_key)
        return size is None or self.vram_total_bytes is None or size <= self.vram_total_bytes

    def has_room(self, model_key: str) -> bool:
        """The model is loaded here, or the GPU has free memory for it (True when unknown)."""
        if model_key in self.resident or model_key in self.loading:
            return True
        size = self.model_sizes.get(model_key)
        return size is None or self.vram_free_bytes is None or size <= self.vram_free_bytes

    def error_stats(self, now: float, window_s: float) -> tuple[int, int]:
        total = bad = 0
        for at, ok in reversed(self.outcomes):
            if now - at > window_s:
                break
            total += 1
            bad += not ok
        return total, bad

    def candidate(self, weight: float) -> Candidate:
        availability = (
            sum(self.probe_history) / len(self.probe_history) if self.probe_history else 1.0
        )
        total = len(self.outcomes)
        success = 1.0 if total == 0 else 1.0 - self.bad_outcomes / total
        # Positional: built for every free backend on every pick, and cheaper so.
        return Candidate(
            self.id,
            weight,
            self.in_flight + self.elsewhere,
            self.max_concurrent,
            self.total_requests,
            self.ttft.value,
            success,
            availability,
        )


class BackendRegistry:
    """Owns the backends and their slots (:meth:`reserve` / :meth:`release`)."""

    def __init__(self, backends: Iterable[BackendState] = (), *, clock: Clock = time.monotonic):
        self._backends: dict[str, BackendState] = {}
        self._clock = clock
        self._listeners: list[Callable[[str, BackendState | None], None]] = []
        # Every model key some backend lists (kept current by refresh_models).
        self.known_models: frozenset[str] = frozenset()
        # Models a fleet-wide pull, copy or create is bringing, counted per operation: a request
        # for one waits for it in the queue instead of getting Ollama's 404.
        self.coming: dict[str, int] = {}
        self._model_listeners: list[Callable[[], None]] = []
        # Called whenever capacity may have appeared: a slot freed, a backend came up or joined.
        self._capacity_listeners: list[Callable[[], None]] = []
        for backend in backends:
            self.add(backend)

    def on_change(self, listener: Callable[[str, BackendState | None], None]) -> None:
        """Call ``listener(event, backend)`` on add/remove/update."""
        self._listeners.append(listener)

    def _emit(self, event: str, backend: BackendState | None) -> None:
        for listener in self._listeners:
            listener(event, backend)
        self.notify()

    def refresh_models(self) -> None:
        """Recompute :attr:`known_models` after a backend's model list changed."""
        known = frozenset().union(*(b.models for b in self._backends.values()))
        if known != self.known_models:
            self.known_models = known
            self._models_changed()

    def on_models(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when the fleet's models change (:attr:`known_models` or
        :attr:`coming`)."""
        self._model_listeners.append(listener)

    def _models_changed(self) -> None:
        for listener in self._model_listeners:
            listener()

    @contextmanager
    def bringing(self, model_keys: Iterable[str]) -> Iterator[None]:
        """While the block runs, ``model_keys`` count as known (see :attr:`coming`)."""
        keys = list(dict.fromkeys(model_keys))
        for key in keys:
            self.coming[key] = self.coming.get(key, 0) + 1
        try:
            yield
        finally:
            for key in keys:
                if self.coming[key] <= 1:
                    del self.coming[key]
                else:
                    self.coming[key] -= 1
            self._models_changed()  # waiters for a model that did not come get their 404

    def on_capacity(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a slot may have become free (the queue dispatches)."""
        self._capacity_listeners.append(listener)

    def off_capacity(self, listener: Callable[[], None]) -> None:
        self._capacity_listeners.remove(listener)

    def notify(self) -> None:
        for listener in self._capacity_listeners:
            listener()

    def __contains__(self, backend_id: object) -> bool:
        return backend_id in self._backends

    def __iter__(self) -> Any:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def all(self) -> list[BackendState]:
        return list(self._backends.values())

    def ids(self) -> list[str]:
        return list(self._backends)

    def get(self, backend_id: str) -> BackendState:
        try:
            return self._backends[backend_id]
        except KeyError:
            raise UnknownBackendError(backend_id) from None

    def add(self, backend: BackendState) -> BackendState:
        if backend.id in self._backends:
            raise DuplicateBackendError(backend.id)
        self._backends[backend.id] = backend
        self._emit("added", backend)
        return backend

    def remove(self, backend_id: str) -> BackendState:
        backend = self.get(backend_id)
        del self._backends[backend_id]
        self.refresh_models()
        self._emit("removed", backend)
        return backend

    def drain(self, backend_id: str) -> BackendState:
        backend = self.get(backend_id)
        backend.draining = True
        self._emit("updated", backend)
        return backend

    def enable(self, backend_id: str) -> BackendState:
        backend = self.get(backend_id)
        backend.draining = False
        backend.ejected_until = 0.0
        self._emit("updated", backend)
        return backend

    def heartbeat(self, backend_id: str, ttl_s: float | None = None) -> BackendState:
        """Extend a dynamic backend's registration by ``ttl_s`` (default: its own ttl)."""
        backend = self.get(backend_id)
        ttl = ttl_s or backend.ttl_s
        if ttl:
            backend.expires_at = self._clock() + ttl
            if backend.expired:
                backend.expired = False
                backend.draining = False
                self._emit("updated", backend)
        return backend

    def expire(self) -> list[str]:
        """Dynamic backends past their deadline leave rotation, and go once idle.

        Returns the ids removed.
        """
        now = self._clock()
        gone = []
        for b in list(self._backends.values()):
            if not b.dynamic or b.expires_at is None or b.expires_at > now:
                continue
            if not b.expired:
                b.expired = True
                b.draining = True
                self._emit("expired", b)
            if b.in_flight == 0:
                gone.append(b.id)
                self.remove(b.id)
        return gone

    def reserve(self, backend: BackendState) -> None:
        """Take one slot on ``backend`` (counted in-flight until :meth:`release`)."""
        backend.in_flight += 1
        backend.total_requests += 1
        backend.last_used = time.time()

    def release(self, backend: BackendState) -> None:
        """Give a slot back; queued requests are dispatched at once."""
        backend.in_flight -= 1
        self.notify()

    @asynccontextmanager
    async def lease(self, backend: BackendState) -> AsyncIterator[BackendState]:
        """Hold one slot on ``backend`` for the duration of the block."""
        self.reserve(backend)
        try:
            yield backend
        finally:
            self.release(backend)
