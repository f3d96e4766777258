"""Listings merged from every healthy backend: ``/api/tags``, ``/api/ps``, ``/v1/models``,
``/api/version``.

One backend cannot break a listing: an answer that is no model list, an entry without a
string name or with a size that is no count, a version that is no version, are left out (and
counted in ``corral_backend_malformed``); the rest answer. Each backend answer is read at most
``MAX_BODY_BYTES`` (corral.upstream).

``/api/version`` is the open liveness route, so the answers are cached for ``CACHE_S`` and
callers in the same moment share one fan-out: a thousand clients polling it cost the backends
one request each per second. :meth:`Listing.invalidate` forgets them when models changed (the
registry calls it when the fleet's set of models changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from corral.asgi import Scope, Send
from corral.errors import NoBackendError, UpstreamError, UpstreamMalformedError
from corral.fleet import inventory
from corral.fleet.backends import BackendRegistry, BackendState
from corral.metrics import Metrics
from corral.proxy.relay import JSON, Reply, send_bytes
from corral.upstream import Upstream

log = structlog.get_logger("corral.listing")

# How long a fan-out's answers serve later callers.
CACHE_S = 1.0

# What one backend contributed: model entries (tags, ps) or a version string.
Results = list[tuple[str, Any]]


class Listing:
    """Answers the aggregated routes by asking every available backend at once."""

    def __init__(
        self,
        registry: BackendRegistry,
        upstream: Upstream,
        timeout_s: float,
        metrics: Metrics | None = None,
        *,
        cache_s: float = CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.cache_s = cache_s
        self._clock = clock
        # path -> (the backends asked, when the answers came, the answers)
        self._cache: dict[str, tuple[tuple[str, ...], float, Results]] = {}
        self._inflight: dict[tuple[str, tuple[str, ...]], asyncio.Future[Results]] = {}
        self._generation = 0
        self._unusable = inventory.Unusable(metrics, log, "backend answer left out of a listing")
        # A probe that finds the fleet's models changed (after a pull, say) makes them stale.
        registry.on_models(self.invalidate)

    def invalidate(self) -> None:
        """Forget every cached listing (a pull, delete, copy or create changed the models):
        the next call asks the backends again, and a fan-out still under way is not kept."""
        self._generation += 1
        self._cache.clear()
        self._inflight.clear()

    async def _results(self, path: str) -> Results:
        now = self._clock()
        backends = [b for b in self.registry.all() if b.available(now)]
        if not backends:
            raise NoBackendError("no healthy backend available")
        ids = tuple(b.id for b in backends)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == ids and now - hit[1] < self.cache_s:
            return hit[2]
        key = (path, ids)
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fan_out(path, backends, self._generation))
            pending.add_done_callback(_retrieve)
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._settled(key, pending))
        # Shielded: one caller that leaves does not cancel the answer the others wait for.
        return await asyncio.shield(pending)

    def _settled(self, key: tuple[str, tuple[str, ...]], done: asyncio.Future[Results]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]

    async def _fan_out(self, path: str, backends: list[BackendState], generation: int) -> Results:
        answers = await asyncio.gather(*(self._one(b, path) for b in backends))
        results = [(b.id, a) for b, a in zip(backends, answers, strict=True) if a is not None]
        if generation == self._generation:
            self._cache[path] = (tuple(b.id for b in backends), self._clock(), results)
        return results

    async def _one(self, backend: BackendState, path: str) -> Any:
        """One backend's usable answer (entries, or a version); None when it has none."""
        try:
            answer = await self.upstream.get_json(backend.url + path, self.timeout_s)
            if path == "/api/version":
                version = inventory.version_of(answer)
                if version is None:
                    self._unusable.note(backend.id, "bad_entry", "/api/version: no usable version")
                return version
            entries, skipped = inventory.model_entries(answer, path)
        except UpstreamMalformedError as exc:
            self._unusable.note(backend.id, exc.reason, str(exc))
            return None
        except UpstreamError:
            return None
        if skipped:
            self._unusable.note(backend.id, "bad_entry", f"{path}: entries skipped", skipped)
        return entries

    async def aggregated(self, scope: Scope, send: Send, path: str, request_id: str) -> None:
        """``/api/tags``, ``/api/ps`` or ``/v1/models``: every backend's answer, merged."""
        try:
            results = await self._results("/api/tags" if path == "/v1/models" else path)
        except NoBackendError as exc:
            await Reply(send, request_id, "openai" if path.startswith("/v1/") else "ollama").fail(
                exc
            )
            return
        if path == "/api/ps":
            payload: dict[str, Any] = {"models": merge_ps(results)}
        else:
            models = merge_tags(results)
            payload = {"models": models} if path == "/api/tags" else openai_models(models)
        body = json.dumps(payload, separators=(",", ":")).encode()
        answered = ",".join(backend_id for backend_id, _ in results).encode()
        headers = [JSON, (b"x-request-id", request_id.encode()), (b"x-corral-backend", answered)]
        await send_bytes(send, 200, body, headers, head=scope["method"] == "HEAD")

    async def version(self, send: Send, *, head: bool) -> None:
        """The oldest version among the backends (what every one of them supports)."""
        try:
            found = [v for _, v in await self._results("/api/version")]
        except NoBackendError:
            found = []
        version = min(found, key=version_key) if found else "0.0.0"
        body = json.dumps({"version": version}, separators=(",", ":")).encode()
        await send_bytes(send, 200, body, [JSON], head=head)


def _retrieve(done: asyncio.Future[Results]) -> None:
    """Mark a fan-out's failure as seen (its waiters, if any are left, get it too)."""
    if not done.cancelled():
        done.exception()


def merge_tags(results: Results) -> list[dict[str, Any]]:
    """Union of every backend's models (well-formed entries), one entry per name, newest
    first."""
    seen: dict[str, dict[str, Any]] = {}
    for _, entries in results:
        for model in entries:
            seen.setdefault(inventory.entry_name(model), model)
    return sorted(seen.values(), key=lambda m: str(m.get("modified_at", "")), reverse=True)


def merge_ps(results: Results) -> list[dict[str, Any]]:
    """Every backend's running models, each tagged with the backend that holds it."""
    merged = [{**m, "backend": backend_id} for backend_id, entries in results for m in entries]
    merged.sort(key=lambda m: str(m.get("expires_at", "")), reverse=True)
    return merged


def openai_models(models: list[dict[str, Any]]) -> dict[str, Any]:
    data = []
    for model in models:
        name = inventory.entry_name(model)
        created = 0
        with contextlib.suppress(ValueError, TypeError, OverflowError, OSError):
            created = int(datetime.fromisoformat(str(model.get("modified_at"))).timestamp())
        parts = name.split("/")
        owner = parts[-2] if len(parts) > 1 else "library"
        data.append({"id": name, "object": "model", "created": created, "owned_by": owner})
    return {"object": "list", "data": data}


def version_key(version: str) -> tuple[int, ...]:
    """Order ``0.33.0-rc2`` style versions numerically; a pre-release sorts before its release.
    (Each number is read from at most 18 digits: a version is no place for a bignum.)"""
    core, _, pre = version.lstrip("v").partition("-")
    nums = []
    for part in core.split(".")[:8]:
        digits = "".join(ch for ch in part if ch.isdigit())[:18]
        nums.append(int(digits) if digits else 0)
    while len(nums) < 3:
        nums.append(0)
    return (*nums, 0 if pre else 1)
