"""The admin API (``/api/v1/loadbalancer``): strategy, loads, backends, stats."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from corral.auth import admin_refusal
from corral.config import BackendSettings
from corral.errors import (
    DuplicateBackendError,
    NotInstalledError,
    UnknownBackendError,
    UnknownStrategyError,
)
from corral.fleet import inventory
from corral.fleet.backends import BackendState
from corral.runtime import Runtime


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def require_admin(request: Request) -> None:
    """X-API-Key or Bearer must match the admin key; with no key set, local callers only
    (a loopback peer and ``Host``, no proxy between: the edge guard's ``corral.local``)."""
    denied = admin_refusal(_runtime(request).admin_key, request.scope)
    if denied is not None:
        status, message, _ = denied
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        raise HTTPException(status, message, headers=headers)


class _AdminRoute(APIRoute):
    """An admin route: the caller is checked before its body is read (a stranger's body is
    neither read nor parsed, nor answered with a 422), and validation errors are answered
    here: FastAPI's own handler fails with a 500 when the input it echoes back is bytes that
    are not UTF-8, a lone surrogate or NaN (fastapi#13111)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            require_admin(request)
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return JSONResponse({"detail": [_plain(e) for e in exc.errors()]}, 422)

        return route


def _plain(error: Any) -> dict[str, Any]:
    """One validation error, with its ``input`` and ``ctx`` kept only if they encode as JSON."""
    plain = {k: error[k] for k in ("type", "loc", "msg") if k in error}
    for key in ("input", "ctx"):
        if key not in error:
            continue
        try:
            value = jsonable_encoder(error[key], custom_encoder={bytes: _text})
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
        except (ValueError, TypeError, RecursionError):  # UnicodeError is a ValueError
            continue
        plain[key] = value
    return plain


def _text(data: bytes) -> str:
    return data.decode(errors="replace")


router = APIRouter(prefix="/api/v1/loadbalancer", route_class=_AdminRoute)
RuntimeDep = Annotated[Runtime, Depends(_runtime)]


class StrategyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: str = Field(min_length=1, max_length=64)


class BackendBody(BackendSettings):
    """A backend registered at runtime: the config's fields, plus ``ttl_s``."""

    max_concurrent: int = Field(4, ge=1, le=10_000)
    gpu_metrics_url: str | None = Field(None, max_length=2048)
    ttl_s: float | None = Field(None, gt=0)


class BackendPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["drain", "enable"] | None = None
    weight: float | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, ge=1, le=10_000)


class HeartbeatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_s: float | None = Field(None, gt=0)


class PlacementBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["preload", "unload", "gpu", "cpu"]
    backend: str | None = Field(None, min_length=1, max_length=64)


def load_entry(runtime: Runtime, b: BackendState) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "instance_id": b.id,
        "url": b.url,
        "active_connections": b.in_flight + b.elsewhere,
        "max_concurrent": b.max_concurrent,
        "max_loaded_models": b.max_loaded_models,
        "total_connections": b.total_requests,
        "failures": b.total_failures,
        "avg_response_time": b.avg_response_time,
        "last_response_time": b.last_response_time,
        "ttft_ewma_s": b.ttft.value,
        "weight": runtime.router.weight_of(b),
        "last_used": b.last_used,
        "healthy": b.healthy,
        "draining": b.draining,
        "ejected": b.is_ejected(now),
        "available": b.available(now),
        "dynamic": b.dynamic,
        "fallback": b.fallback,
        "gpu": b.gpu,
        "gpu_metrics_url": b.gpu_metrics_url,
        "gpu_stats": runtime.gpus.backend_summary(b),
        "vram_total_bytes": b.vram_total_bytes,
        "vram_free_bytes": b.vram_free_bytes,
        "gpu_hot": b.gpu_hot,
        "version": b.version,
        "models": sorted(b.model_names),
        "resident": sorted(b.resident),
    }


@router.get("/strategy")
async def get_strategy(runtime: RuntimeDep) -> dict[str, str]:
    return {"strategy": runtime.router.strategy_name}


@router.put("/strategy")
async def put_strategy(body: StrategyBody, runtime: RuntimeDep) -> dict[str, str]:
    old = runtime.router.strategy_name
    try:
        runtime.set_strategy(body.strategy)
    except UnknownStrategyError as exc:
        raise HTTPException(400, str(exc)) from None
    await runtime.publish("strategy", "balancer", body.strategy)
    return {"strategy": body.strategy, "message": f"strategy changed from {old} to {body.strategy}"}


@router.get("/loads")
async def loads(runtime: RuntimeDep) -> dict[str, Any]:
    backends = runtime.registry.all()
    return {
        "strategy": runtime.router.strategy_name,
        "count": len(backends),
        "loads": {b.id: load_entry(runtime, b) for b in backends},
    }


@router.get("/load")
async def load(
    runtime: RuntimeDep, instance_id: Annotated[str, Query(min_length=1)]
) -> dict[str, Any]:
    try:
        return load_entry(runtime, runtime.registry.get(instance_id))
    except UnknownBackendError as exc:
        raise HTTPException(404, str(exc)) from None


@router.get("/backends")
async def list_backends(runtime: RuntimeDep) -> dict[str, Any]:
    return {"backends": [load_entry(runtime, b) for b in runtime.registry.all()]}


@router.post("/backends", status_code=201)
async def add_backend(body: BackendBody, runtime: RuntimeDep) -> dict[str, Any]:
    backend = BackendState.from_settings(body, registered=True, ttl_s=body.ttl_s)
    try:
        runtime.registry.add(backend)
    except DuplicateBackendError as exc:
        raise HTTPException(409, str(exc)) from None
    await runtime.publish("backends", backend.id, backend.record())
    await runtime.health.probe(backend)
    await runtime.gpus.poll()
    return load_entry(runtime, backend)


@router.patch("/backends/{backend_id}")
async def patch_backend(backend_id: str, body: BackendPatch, runtime: RuntimeDep) -> dict[str, Any]:
    if body.action is None and body.weight is None and body.max_concurrent is None:
        raise HTTPException(
            400, "nothing to change: give action (drain|enable), weight or max_concurrent"
        )
    try:
        backend = runtime.registry.get(backend_id)
        if body.action == "drain":
            runtime.registry.drain(backend_id)
        elif body.action == "enable":
            runtime.registry.enable(backend_id)
        if body.weight is not None:
            backend.weight = body.weight
        if body.max_concurrent is not None:
            backend.max_concurrent = body.max_concurrent
            runtime.registry.notify()
    except UnknownBackendError as exc:
        raise HTTPException(404, str(exc)) from None
    if body.action is not None:
        await runtime.publish("drains", backend_id, True if body.action == "drain" else None)
    if body.weight is not None:
        await runtime.publish("weights", backend_id, body.weight)
    if body.max_concurrent is not None:
        await runtime.publish("max_concurrent", backend_id, body.max_concurrent)
    return load_entry(runtime, backend)


@router.delete("/backends/{backend_id}")
async def remove_backend(
    backend_id: str, runtime: RuntimeDep, force: Annotated[bool, Query()] = False
) -> dict[str, Any]:
    """Drain, wait for in-flight requests to finish (up to drain_timeout_s), then remove.

    ``?force=true`` removes at once; requests still running finish on their own.
    """
    try:
        backend = runtime.registry.get(backend_id)
    except UnknownBackendError as exc:
        raise HTTPException(404, str(exc)) from None
    if not force and backend.in_flight:
        runtime.registry.drain(backend_id)
        await runtime.publish("drains", backend_id, True)
        grace = runtime.settings.server.drain_timeout_s
        if not await runtime.wait_idle(backend, grace):
            raise HTTPException(
                409,
                f"backend {backend_id!r} still has {backend.in_flight} request(s) in flight "
                f"after {grace:g}s; it stays drained: retry, or DELETE with ?force=true",
            )
    try:
        runtime.registry.remove(backend_id)
    except UnknownBackendError as exc:  # removed meanwhile (expired, another DELETE)
        raise HTTPException(404, str(exc)) from None
    if backend.registered:
        await runtime.publish("backends", backend_id, None)
    for kind in ("drains", "weights", "max_concurrent", "heartbeats"):
        await runtime.publish(kind, backend_id, None)
    return {"removed": backend.id, "in_flight": backend.in_flight}


@router.post("/backends/{backend_id}/heartbeat")
async def heartbeat(
    backend_id: str, runtime: RuntimeDep, body: HeartbeatBody | None = None
) -> dict[str, Any]:
    try:
        backend = runtime.registry.get(backend_id)
    except UnknownBackendError as exc:
        raise HTTPException(404, str(exc)) from None
    if not backend.dynamic:
        raise HTTPException(
            400, f"backend {backend_id!r} was registered without ttl_s; it needs no heartbeat"
        )
    ttl = body.ttl_s if body and body.ttl_s else backend.ttl_s
    runtime.registry.heartbeat(backend_id, ttl)
    # A changing value, so that every replica hears each heartbeat.
    await runtime.publish("heartbeats", backend_id, {"ttl_s": ttl, "at": time.time()})
    return {"instance_id": backend_id, "ttl_s": ttl}


@router.get("/gpus")
async def gpus(runtime: RuntimeDep) -> dict[str, Any]:
    """Every GPU corral reads (NVML here, DCGM exporters, /api/ps) and the backends on each."""
    return runtime.gpus.status()


@router.get("/models")
async def models(runtime: RuntimeDep) -> dict[str, Any]:
    """Every model a backend has installed or loaded, and where it runs on each."""
    return {
        "models": inventory.models_view(runtime.registry),
        # Fleet-wide operations a backend missed, replayed once it is available again.
        "replays": [r.view() for r in runtime.ledger.all()],
    }


@router.post("/models/{name:path}/placement")
async def place_model(name: str, body: PlacementBody, runtime: RuntimeDep) -> dict[str, Any]:
    """Load, unload, or move ``name`` to GPU or CPU on one backend (or every one that has it);
    answers each backend's outcome and where the model runs there now."""
    try:
        results = await runtime.placement.act(body.action, name, body.backend)
        if body.action in ("unload", "cpu"):
            runtime.replicas.pause(name)  # the admin's word stands: no copy loaded back soon
    except (UnknownBackendError, NotInstalledError) as exc:
        raise HTTPException(404, str(exc)) from None
    return {"model": name, "action": body.action, "results": results}


@router.get("/stats")
async def stats(runtime: RuntimeDep) -> dict[str, Any]:
    now = time.monotonic()
    backends = runtime.registry.all()
    usable = [b for b in backends if b.available(now)]
    capacity = sum(b.max_concurrent for b in usable)
    current = sum(b.in_flight + b.elsewhere for b in backends)
    return {
        "strategy": runtime.router.strategy_name,
        "backends": len(backends),
        "healthy": len(usable),
        "total_capacity": capacity,
        "current_load": current,
        "utilization": round(current / capacity, 4) if capacity else 0.0,
        "queued": runtime.admission.queued,
        "queued_by_priority": runtime.admission.queued_by_priority(),
        "retried": runtime.forwarder.retries,
    }


def _samples(runtime: Runtime, name: str) -> list[Any]:
    found = []
    for family in runtime.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found.append(sample)
    return found


def health_routes(*, metrics: bool = True) -> APIRouter:
    """``/healthz``, ``/readyz`` and (unless ``metrics`` is False) ``/metrics``: no key needed,
    except for ``/metrics`` with ``server.metrics_auth`` (then as the admin API)."""
    plain = APIRouter()

    @plain.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @plain.get("/readyz")
    async def readyz(runtime: RuntimeDep, response: Response) -> dict[str, Any]:
        now = time.monotonic()
        healthy = sum(b.available(now) for b in runtime.registry.all())
        if runtime.draining or healthy == 0:
            response.status_code = 503
            return {
                "status": "draining" if runtime.draining else "no healthy backend",
                "healthy": healthy,
            }
        return {"status": "ready", "healthy": healthy}

    if metrics:

        @plain.get("/metrics")
        async def render_metrics(request: Request, runtime: RuntimeDep) -> Response:
            # server.metrics_auth: the admin key, as the admin API takes it.
            if runtime.settings.server.metrics_auth:
                require_admin(request)
            metrics = runtime.metrics
            return Response(await metrics.render_host(), media_type=metrics.content_type)

    return plain
