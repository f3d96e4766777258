"""create_app: the ASGI application (lean Ollama front + FastAPI admin), with its lifespan.

Everything a listener serves passes the edge guard first (:mod:`corral.guard`: Host, Origin,
cross-site requests, forwarded clients). With ``server.admin_port`` the admin listener serves
the admin API, /metrics, /ui, the schema, and model management (pull, push, create, copy,
delete, blobs: the same fan-out as the main port had); the main port refuses management.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.admin.api import health_routes, router
from corral.admin.ui import ui_routes
from corral.asgi import ASGIApp, Receive, Scope, Send
from corral.auth import is_loopback
from corral.config import Settings
from corral.fleet.gpu import GpuSampler
from corral.guard import EdgeGuard, host_name, is_management
from corral.proxy.front import OllamaFront
from corral.proxy.passthrough import Passthrough
from corral.proxy.relay import METHOD_NOT_ALLOWED, NOT_FOUND
from corral.runtime import Runtime
from corral.upstream import Upstream


def _build_fastapi(runtime: Runtime, *, admin: bool = True) -> FastAPI:
    """The FastAPI part: admin API, /metrics, /ui and the schema, plus /healthz and /readyz.

    ``admin=False`` builds what the main port keeps when ``server.admin_port`` moves the rest
    to its own listener: /healthz and /readyz only. The OpenAPI schema (``/openapi.json``) is
    served only with ``server.docs``; /docs and /redoc never are: FastAPI's pages load
    swagger-ui and ReDoc from a public CDN into the origin where /ui keeps the admin key, and
    the schema can be read with any OpenAPI viewer instead.
    """
    api = FastAPI(
        title="corral",
        version=__version__,
        description="Admin API of corral, an Ollama-compatible load balancer.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if admin and runtime.settings.server.docs else None,
    )
    api.state.runtime = runtime
    api.include_router(health_routes(metrics=admin))
    if admin:
        api.include_router(router)
        api.include_router(ui_routes())

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        # Outside the admin API, unknown paths look exactly like Ollama's.
        if not request.url.path.startswith("/api/v1/loadbalancer"):
            if exc.status_code == 404:
                return PlainTextResponse(NOT_FOUND, 404)
            if exc.status_code == 405:
                return PlainTextResponse(METHOD_NOT_ALLOWED, 405)
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    return api


class AdminListener:
    """The admin listener's app (``server.admin_port``): model management goes to the shared
    Ollama front (and so to the one fan-out), everything else to the admin FastAPI app."""

    def __init__(self, front: ASGIApp, api: ASGIApp) -> None:
        self.front = front
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_management(scope["path"]):
            await self.front(scope, receive, send)
        else:
            await self.api(scope, receive, send)


class CorralApp:
    """The ASGI callable uvicorn serves; ``admin_api`` is the admin listener's (or None)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        server = runtime.settings.server
        separate = server.admin_port is not None
        self.api = _build_fastapi(runtime, admin=not separate)
        self.front = OllamaFront(
            fallback=self.api,
            forwarder=runtime.forwarder,
            registry=runtime.registry,
            listing=runtime.listing,
            metrics=runtime.metrics,
            fanout=runtime.fanout,
            passthrough=Passthrough(
                runtime.registry,
                runtime.upstream,
                account_backend=runtime.settings.account.backend,
                admin_key=runtime.admin_key,
                bodies=runtime.bodies,
            ),
            clients=runtime.clients,
            bodies=runtime.bodies,
            expose_backend=runtime.settings.server.expose_backend_header,
        )
        self.guard = EdgeGuard(
            self.front, server, runtime.metrics, bind_host=server.host, management=not separate
        )
        # With server.admin_port: the app its own (loopback by default) listener serves.
        self.admin_api: ASGIApp | None = None
        if separate:
            listener = AdminListener(self.front, _build_fastapi(runtime))
            self.admin_api = EdgeGuard(
                listener, server, runtime.metrics, bind_host=server.admin_host
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.guard(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.runtime.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                warn_if_open(self.runtime)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.runtime.draining = True
                await self.runtime.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def warn_if_open(runtime: Runtime) -> None:
    """One warning line when a listener is bound beyond loopback with neither an admin key
    nor client keys: anyone who reaches it can run models on these GPUs."""
    if runtime.admin_key is not None or runtime.clients.enabled:
        return
    server = runtime.settings.server
    bound = [(server.host, server.port)]
    if server.admin_port is not None:
        bound.append((server.admin_host, server.admin_port))
    exposed = [f"{h}:{p}" for h, p in bound if not is_loopback(host_name(h))]
    if exposed:
        structlog.get_logger("corral").warning(
            "listening beyond loopback with no keys",
            listeners=exposed,
            hint="anyone who can reach it can use the GPUs; set CORRAL_CLIENT_KEYS and "
            "CORRAL_ADMIN_KEY (or [auth] key files), or bind to 127.0.0.1",
        )


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    gpu_sampler: GpuSampler | None = None,
) -> CorralApp:
    """Build corral's ASGI app; background tasks start with the ASGI lifespan."""
    return CorralApp(Runtime(settings, upstream=upstream, gpu_sampler=gpu_sampler))
