"""Placement: which Ollama holds which model, on GPU or CPU, and the admin's placement actions.

Ollama places a model inside one server; corral chooses the servers. A placement pass runs
every ``placement.interval_s`` (the first right after start) over the backends that take
requests, after re-reading their ``/api/tags`` and ``/api/ps``. For each priority model, in
config order (the first gets GPU memory first):

1. **Back to GPU.** A copy found ``partial`` or ``cpu`` (Ollama's ``/api/ps`` rule) is unloaded
   and loaded again, without ``num_gpu``, on a backend with room on its GPU: the same backend
   when unloading it leaves room, else the idle backend with the most free memory.
2. **Preload.** A priority model no backend holds is loaded where there is room, and also on
   every other backend that has it installed and room for it without evicting anything, so its
   load can spread without a cold start.
3. **Keep warm.** A copy on GPU that would expire (``expires_at``) before the pass after next is
   loaded again with ``placement.keep_alive`` (default -1: forever).

*Room*: ``vram_free_bytes`` (from NVML or a DCGM exporter) at least the model's size (its
``/api/ps`` size where it is loaded somewhere, else its ``/api/tags`` size). When no backend has
room, non-priority models are unloaded on one backend, least recently used first, until it
has: Ollama restarts a model's keep-alive timer after every request, so the earliest
``expires_at`` is the model used least recently. A model in use shows ``now + keep_alive`` and
sorts last; models corral just sent a cold request to are never picked; backends with requests
in flight are picked only when no idle one can make room (corral counts requests per backend,
not per model). A priority model is never unloaded to make room. Where the VRAM is unknown
nothing is moved or evicted; a priority model no backend holds is still loaded on one backend,
and Ollama places it.

Every change is logged (one line: action, model, backend, reason) and counted in
``corral_placement_actions_total{action,backend}``. Loads are ``POST /api/generate`` with an
empty prompt (``/api/embed`` with an empty input for embedding-only models), unloads the same
with ``keep_alive`` 0; after each, the backend is probed so routing sees the change at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import structlog

from corral.config import PlacementSettings
from corral.errors import NotInstalledError, PlacementError, UpstreamError
from corral.fleet import inventory
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model
from corral.metrics import Metrics
from corral.upstream import Upstream

log = structlog.get_logger("corral.placement")

Action = Literal["preload", "unload", "gpu", "cpu"]
# (url, JSON body) -> (HTTP status, decoded JSON body)
Send = Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]
Refresh = Callable[[BackendState], Awaitable[Any]]
Poll = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Change:
    """One placement action a pass took."""

    action: str
    model: str
    backend: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """Where a model goes: ``backend``, after unloading ``evict`` there (LRU first)."""

    backend: BackendState
    evict: tuple[str, ...] = ()


def expiry(entry: dict[str, Any]) -> float | None:
    """An ``/api/ps`` entry's ``expires_at`` (RFC 3339, local offset) as a unix time."""
    text = entry.get("expires_at")
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def lru(backend: BackendState, keep: Iterable[str]) -> list[str]:
    """Models on ``backend`` that may be unloaded for room, least recently used first: they hold
    GPU memory, are not in ``keep`` and no request is loading them."""
    spare = set(keep) | set(backend.loading)
    found = []
    for key, entry in backend.resident.items():
        if key in spare or not _vram(entry):
            continue
        at = expiry(entry)
        found.append((at if at is not None else float("inf"), key))
    return [key for _, key in sorted(found)]


def plan_room(
    candidates: Iterable[BackendState],
    key: str,
    size: int,
    free: dict[str, int | None],
    keep: Iterable[str],
    *,
    current: BackendState | None = None,
) -> Plan | None:
    """The best backend to hold ``size`` bytes of ``key`` on GPU, or None.

    ``free`` is each backend's free VRAM (None: unknown, never chosen). ``current`` holds the
    model off GPU now: unloading it there frees its ``size_vram``. Preference: room without
    evicting (``current`` first, then idle backends); else evicting on an idle backend before a
    busy one, ``current`` first; then fewer evictions, then more free memory.
    """
    keep = set(keep) | {key}
    best: tuple[tuple[Any, ...], Plan] | None = None
    for b in candidates:
        avail = free.get(b.id)
        if avail is None:
            continue
        if b is current:
            avail += _vram(b.resident.get(key))
        victims: list[str] = []
        for victim in lru(b, keep):
            if avail >= size:
                break
            victims.append(victim)
            avail += _vram(b.resident.get(victim))
        if avail < size:
            continue
        busy = b.in_flight > 0
        rank = (bool(victims), bool(victims) and busy, b is not current, busy, len(victims), -avail)
        if best is None or rank < best[0]:
            best = (rank, Plan(b, tuple(victims)))
    return None if best is None else best[1]


def _vram(entry: dict[str, Any] | None) -> int:
    value = (entry or {}).get("size_vram")
    return value if isinstance(value, int) and value > 0 else 0


def name_on(backend: BackendState, key: str, given: str) -> str:
    """The model's name as ``backend`` spells it (``given`` when it lists none)."""
    for name in backend.model_names:
        if normalize_model(name) == key:
            return name
    found = (backend.resident.get(key) or {}).get("name")
    return found if isinstance(found, str) and found else given


def http_sender(upstream: Upstream, timeout_s: float) -> Send:
    """POST JSON through the upstream seam; ``timeout_s`` bounds a whole load."""

    async def send(url: str, body: dict[str, Any]) -> tuple[int, Any]:
        return await upstream.post_json(url, body, timeout_s)

    return send


class PlacementManager:
    """Runs placement passes and the admin's one-shot actions, one at a time."""

    def __init__(
        self,
        registry: BackendRegistry,
        settings: PlacementSettings,
        metrics: Metrics,
        *,
        send: Send,
        refresh: Refresh,
        poll_gpus: Poll | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._send = send
        self._refresh = refresh
        self._poll_gpus = poll_gpus
        self._clock = clock  # wall clock: expires_at is a date
        self._lock = asyncio.Lock()
        self._free: dict[str, int | None] = {}
        self._changes: list[Change] = []
        self.priority = [normalize_model(m) for m in settings.priority_models]

    async def run(self) -> None:
        """A pass every ``interval_s``, the first at once; each catches, logs and counts its
        errors. Cancellation stops it."""
        while True:
            try:
                await self.run_pass()
            except Exception:
                log.exception("placement pass failed")
                self._count("error", "")
            await asyncio.sleep(self.settings.interval_s)

    # One pass -------------------------------------------------------------------------------

    async def run_pass(self) -> list[Change]:
        """Re-read the backends, then put every priority model where the rules say."""
        if not self.priority:
            return []
        async with self._lock:
            up = self._up()
            await asyncio.gather(*(self._refresh(b) for b in up))
            if self._poll_gpus is not None:
                await self._poll_gpus()
            # Free VRAM as of now, kept current through this pass's own loads and unloads.
            self._free = {b.id: b.vram_free_bytes for b in self.registry.all()}
            self._changes = []
            for key in self.priority:
                try:
                    await self._place(key)
                except PlacementError as exc:
                    log.warning("placement failed", model=key, error=str(exc))
            return self._changes

    def _up(self) -> list[BackendState]:
        now = time.monotonic()
        return [b for b in self.registry.all() if b.available(now)]

    async def _place(self, key: str) -> None:
        up = [b for b in self._up() if key in b.models or key in b.resident]
        size = self._size(key)
        done = len(self._changes)
        # 1. Copies off GPU go back to a GPU with room.
        for b in up:
            where = inventory.where(b, key)
            if where not in ("partial", "cpu"):
                continue
            others = [c for c in up if c is b or inventory.where(c, key) != "gpu"]
            plan = self._plan(others, key, size, current=b)
            if plan is None:
                log.info("priority model stays off GPU: no room", model=key, backend=b.id)
                continue
            reason = f"priority model was {where} on {b.id}"
            await self._evict(plan, key)
            if plan.backend is not b:
                await self._do(b, "unload", key, f"{reason}; moved to {plan.backend.id}")
            await self._do(plan.backend, "gpu", key, reason)
        # 2. One copy somewhere (making room), and one wherever it fits as things are.
        if up and not any(key in b.resident for b in up):
            plan = self._plan(up, key, size)
            if plan is not None:
                await self._evict(plan, key)
                await self._do(plan.backend, "preload", key, "held nowhere")
            elif blind := [b for b in up if size is None or self._free.get(b.id) is None]:
                # Its size or the VRAM is unknown: Ollama places it.
                b = min(blind, key=lambda b: (b.in_flight > 0, len(b.resident), b.id))
                await self._do(b, "preload", key, "held nowhere")
            else:
                log.info("priority model not loaded: no GPU has room", model=key, size=size)
        for b in up:
            room = self._free.get(b.id)
            if key not in b.resident and size is not None and room is not None and room >= size:
                await self._do(b, "preload", key, "fits as a warm spare")
        # 3. Keep warm what this pass did not load.
        touched = {c.backend for c in self._changes[done:] if c.model == key}
        horizon = self._clock() + 2 * self.settings.interval_s
        for b in up:
            at = expiry(b.resident.get(key) or {})
            if b.id in touched or at is None or at >= horizon:
                continue
            if inventory.where(b, key) == "gpu":
                await self._do(b, "keep_warm", key, "keep-alive ends before the next pass")

    def _plan(
        self,
        candidates: list[BackendState],
        key: str,
        size: int | None,
        *,
        current: BackendState | None = None,
    ) -> Plan | None:
        if size is None:
            return None
        return plan_room(candidates, key, size, self._free, self.priority, current=current)

    async def _evict(self, plan: Plan, key: str) -> None:
        for victim in plan.evict:
            await self._do(plan.backend, "evict", victim, f"room for priority model {key}")

    async def _do(self, b: BackendState, action: str, key: str, reason: str) -> None:
        """One pass action on ``b``; the free VRAM follows what it frees or takes."""
        before = _vram(b.resident.get(key))
        unloading = action in ("evict", "unload")
        try:
            if unloading or (action == "gpu" and key in b.resident):
                await self._unload(b, key, key)
            if not unloading:
                await self._load(b, key, key)
        except PlacementError:
            self._count("error", b.id)
            await self._refresh(b)
            raise
        await self._refresh(b)
        if (room := self._free.get(b.id)) is not None:
            if unloading:
                after = 0
            elif key in b.resident:
                after = _vram(b.resident[key])
            else:  # loaded, but the probe did not show it yet
                after = self._size(key) or 0
            self._free[b.id] = room + before - after
        self._changed(action, key, b, reason)
        self._changes.append(Change(action, key, b.id, reason))

    def _size(self, key: str) -> int | None:
        """The model's footprint: its /api/ps size where loaded, else its /api/tags size."""
        loaded = [e.get("size") for b in self.registry.all() if (e := b.resident.get(key))]
        sizes = [s for s in loaded if isinstance(s, int) and s > 0]
        if not sizes:
            sizes = [s for b in self.registry.all() if (s := b.model_sizes.get(key))]
        return max(sizes) if sizes else None

    # Admin actions --------------------------------------------------------------------------

    async def preload(self, model: str, backend: str | None = None) -> dict[str, Any]:
        """Load ``model`` (with ``placement.keep_alive``) on ``backend`` or every one with it."""
        return await self.act("preload", model, backend)

    async def unload(self, model: str, backend: str | None = None) -> dict[str, Any]:
        """Unload ``model`` on ``backend`` or every backend that has it."""
        return await self.act("unload", model, backend)

    async def to_gpu(self, model: str, backend: str | None = None) -> dict[str, Any]:
        """Unload, then load without ``num_gpu``: Ollama puts as much on GPU as fits."""
        return await self.act("gpu", model, backend)

    async def to_cpu(self, model: str, backend: str | None = None) -> dict[str, Any]:
        """Load with ``num_gpu`` 0: all on CPU (Ollama reloads it if it runs otherwise)."""
        return await self.act("cpu", model, backend)

    async def act(self, action: Action, model: str, backend: str | None = None) -> dict[str, Any]:
        """Run ``action`` on each target; ``{backend id: {"ok", ...}}``.

        Raises UnknownBackendError, or NotInstalledError when no target has the model.
        """
        key = normalize_model(model)
        targets = self._targets(key, model, backend)

        async def one(b: BackendState) -> dict[str, Any]:
            try:
                if action in ("unload", "gpu"):
                    await self._unload(b, key, model)
                if action != "unload":
                    await self._load(b, key, model, cpu=action == "cpu")
            except PlacementError as exc:
                self._count("error", b.id)
                await self._refresh(b)
                return {"ok": False, "error": str(exc)}
            await self._refresh(b)
            self._changed(action, key, b, "admin request")
            entry = b.resident.get(key) or {}
            return {
                "ok": True,
                "resident": inventory.where(b, key),
                "size": entry.get("size"),
                "size_vram": entry.get("size_vram"),
            }

        async with self._lock:
            results = await asyncio.gather(*(one(b) for b in targets))
        return {b.id: r for b, r in zip(targets, results, strict=True)}

    def _targets(self, key: str, model: str, backend: str | None) -> list[BackendState]:
        if backend is not None:
            b = self.registry.get(backend)
            if key not in b.models and key not in b.resident:
                raise NotInstalledError(f"model {model!r} is not installed on backend {b.id!r}")
            return [b]
        found = [
            b for b in self.registry.all() if b.healthy and (key in b.models or key in b.resident)
        ]
        if not found:
            raise NotInstalledError(f"no healthy backend has model {model!r} installed")
        return found

    # Requests to Ollama -----------------------------------------------------------------------

    async def _load(self, b: BackendState, key: str, given: str, *, cpu: bool = False) -> None:
        body: dict[str, Any] = {
            "model": name_on(b, key, given),
            "prompt": "",
            "keep_alive": self.settings.keep_alive,
            "stream": False,
        }
        if cpu:
            body["options"] = {"num_gpu": 0}
        await self._post(b, body)

    async def _unload(self, b: BackendState, key: str, given: str) -> None:
        body = {"model": name_on(b, key, given), "prompt": "", "keep_alive": 0, "stream": False}
        await self._post(b, body)

    async def _post(self, b: BackendState, body: dict[str, Any]) -> None:
        await post_load(self._send, b, body)

    # Accounting -----------------------------------------------------------------------------

    def _changed(self, action: str, key: str, b: BackendState, reason: str) -> None:
        log.info("placement", action=action, model=key, backend=b.id, reason=reason)
        self._count(action, b.id)

    def _count(self, action: str, backend: str) -> None:
        self.metrics.placement_actions.labels(action=action, backend=backend).inc()


async def post_load(send: Send, b: BackendState, body: dict[str, Any]) -> None:
    """A load or unload (an empty ``/api/generate``; ``/api/embed`` with no input for an
    embedding-only model). Raises PlacementError when the backend refuses or fails."""

    async def call(path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        try:
            return await send(b.url + path, payload)
        except (UpstreamError, OSError) as exc:  # OSError: a sender of its own
            raise PlacementError(f"{b.id}: {exc!r}") from None

    status, answer = await call("/api/generate", body)
    if status == 400 and "does not support generate" in _error(answer):
        embed = {k: v for k, v in body.items() if k not in ("prompt", "stream")}
        status, answer = await call("/api/embed", {**embed, "input": ""})
    if status >= 400:
        raise PlacementError(f"{b.id}: HTTP {status}: {_error(answer) or 'no error text'}")


def _error(answer: Any) -> str:
    text = answer.get("error") if isinstance(answer, dict) else None
    return text if isinstance(text, str) else ""
