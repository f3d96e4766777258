"""create_app: the ASGI application (lean Ollama front + FastAPI admin), with its lifespan."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.admin.api import health_routes, router
from corral.admin.ui import ui_routes
from corral.asgi import Receive, Scope, Send
from corral.config import Settings
from corral.fleet.gpu import GpuSampler
from corral.proxy.front import OllamaFront
from corral.proxy.listing import Listing
from corral.proxy.passthrough import Passthrough
from corral.proxy.relay import METHOD_NOT_ALLOWED, NOT_FOUND
from corral.runtime import Runtime
from corral.upstream import Upstream


def _build_fastapi(runtime: Runtime, *, admin: bool = True) -> FastAPI:
    """The FastAPI part: admin API, /metrics, /ui and docs, plus /healthz and /readyz.

    ``admin=False`` builds what the main port keeps when ``server.admin_port`` moves the rest
    to its own listener: /healthz and /readyz only.
    """
    api = FastAPI(
        title="corral",
        version=__version__,
        description="Admin API of corral, an Ollama-compatible load balancer.",
        docs_url="/docs" if admin else None,
        redoc_url=None,
        openapi_url="/openapi.json" if admin else None,
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


class CorralApp:
    """The ASGI callable uvicorn serves."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        separate = runtime.settings.server.admin_port is not None
        self.api = _build_fastapi(runtime, admin=not separate)
        # With server.admin_port: the app its own (loopback) listener serves.
        self.admin_api = _build_fastapi(runtime) if separate else None
        self.front = OllamaFront(
            fallback=self.api,
            forwarder=runtime.forwarder,
            registry=runtime.registry,
            listing=Listing(
                runtime.registry, runtime.upstream, runtime.settings.health.timeout_s + 3
            ),
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.front(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.runtime.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.runtime.draining = True
                await self.runtime.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    gpu_sampler: GpuSampler | None = None,
) -> CorralApp:
    """Build corral's ASGI app; background tasks start with the ASGI lifespan."""
    return CorralApp(Runtime(settings, upstream=upstream, gpu_sampler=gpu_sampler))
