"""Listings merged from every healthy backend: ``/api/tags``, ``/api/ps``, ``/v1/models``,
``/api/version``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime
from typing import Any

from corral.asgi import Scope, Send
from corral.errors import NoBackendError, UpstreamError
from corral.fleet.backends import BackendRegistry
from corral.proxy.relay import JSON, Reply, send_bytes
from corral.upstream import Upstream


class Listing:
    """Answers the aggregated routes by asking every available backend at once."""

    def __init__(self, registry: BackendRegistry, upstream: Upstream, timeout_s: float) -> None:
        self.registry = registry
        self.upstream = upstream
        self.timeout_s = timeout_s

    async def _fan_out(self, path: str) -> list[tuple[str, Any]]:
        now = time.monotonic()
        backends = [b for b in self.registry.all() if b.available(now)]
        if not backends:
            raise NoBackendError("no healthy backend available")

        async def one(url: str) -> Any:
            try:
                return await self.upstream.get_json(url + path, self.timeout_s)
            except UpstreamError:
                return None

        results = await asyncio.gather(*(one(b.url) for b in backends))
        return [(b.id, r) for b, r in zip(backends, results, strict=True) if r is not None]

    async def aggregated(self, scope: Scope, send: Send, path: str, request_id: str) -> None:
        """``/api/tags``, ``/api/ps`` or ``/v1/models``: every backend's answer, merged."""
        try:
            results = await self._fan_out("/api/tags" if path == "/v1/models" else path)
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
            versions = [v for _, v in await self._fan_out("/api/version")]
        except NoBackendError:
            versions = []
        found = [
            str(v.get("version")) for v in versions if isinstance(v, dict) and v.get("version")
        ]
        version = min(found, key=version_key) if found else "0.0.0"
        body = json.dumps({"version": version}, separators=(",", ":")).encode()
        await send_bytes(send, 200, body, [JSON], head=head)


def merge_tags(results: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Union of every backend's models, one entry per name, newest first."""
    seen: dict[str, dict[str, Any]] = {}
    for _, data in results:
        for model in (data or {}).get("models") or []:
            name = model.get("name") or model.get("model")
            if name and name not in seen:
                seen[name] = model
    return sorted(seen.values(), key=lambda m: str(m.get("modified_at", "")), reverse=True)


def merge_ps(results: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Every backend's running models, each tagged with the backend that holds it."""
    merged: list[dict[str, Any]] = []
    for backend_id, data in results:
        for model in (data or {}).get("models") or []:
            merged.append({**model, "backend": backend_id})
    merged.sort(key=lambda m: str(m.get("expires_at", "")), reverse=True)
    return merged


def openai_models(models: list[dict[str, Any]]) -> dict[str, Any]:
    data = []
    for model in models:
        name = model.get("name") or model.get("model")
        created = 0
        with contextlib.suppress(ValueError):
            created = int(datetime.fromisoformat(str(model.get("modified_at"))).timestamp())
        parts = str(name).split("/")
        owner = parts[-2] if len(parts) > 1 else "library"
        data.append({"id": name, "object": "model", "created": created, "owned_by": owner})
    return {"object": "list", "data": data}


def version_key(version: str) -> tuple[int, ...]:
    """Order ``0.33.0-rc2`` style versions numerically; a pre-release sorts before its release."""
    core, _, pre = version.lstrip("v").partition("-")
    nums = []
    for part in core.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    while len(nums) < 3:
        nums.append(0)
    return (*nums, 0 if pre else 1)
