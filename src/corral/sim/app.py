"""The simulator as one lean pure-ASGI application: a dict lookup routes each request, Gin's
404/405 answers the rest, and inference routes watch for the client going away."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from corral.asgi import Receive, Scope, Send, zstd_decoded
from corral.shapes import Shape
from corral.sim import account, compat, control, manage, messages, native, responses, v1
from corral.sim.config import SimConfig
from corral.sim.core import Sim
from corral.sim.stats import RequestRecord
from corral.sim.wire import ClientGone, Exchange, HTTPError

Handler = Callable[[Sim, Exchange], Awaitable[None]]


class Route(NamedTuple):
    """How one (path, method) is served."""

    name: str  # the route as counted in stats (path parameters as {name})
    handler: Handler
    watch: bool = False  # cancel the handler when the client disconnects
    shape: Shape = "ollama"  # the shape of its errors
    internal: bool = False  # /_sim: not counted in stats


def _table() -> dict[str, dict[str, Route]]:
    def r(
        name: str,
        handler: Handler,
        *methods: str,
        watch: bool = False,
        openai: bool = False,
        anthropic: bool = False,
        internal: bool = False,
    ) -> tuple[str, dict[str, Route]]:
        shape: Shape = "anthropic" if anthropic else "openai" if openai else "ollama"
        route = Route(name, handler, watch, shape, internal)
        return name, dict.fromkeys(methods, route)

    return dict(
        [
            r("/", manage.root, "GET", "HEAD"),
            r("/api/version", manage.version, "GET", "HEAD"),
            r("/api/generate", native.generate, "POST", watch=True),
            r("/api/chat", native.chat, "POST", watch=True),
            r("/api/embed", native.embed, "POST", watch=True),
            r("/api/embeddings", native.embeddings, "POST", watch=True),
            r("/api/tags", manage.tags, "GET", "HEAD"),
            r("/api/ps", manage.ps, "GET"),
            r("/api/show", manage.show, "POST"),
            r("/api/pull", manage.pull, "POST", watch=True),
            r("/api/push", manage.push, "POST", watch=True),
            r("/api/create", manage.create, "POST", watch=True),
            r("/api/copy", manage.copy, "POST"),
            r("/api/delete", manage.delete, "DELETE"),
            r("/api/blobs/{digest}", manage.blob, "HEAD", "POST"),
            r("/api/status", account.status, "GET"),
            r("/api/me", account.whoami, "POST"),
            r("/api/signout", account.signout, "POST"),
            r("/api/user/keys/{key}", account.signout, "DELETE"),
            r("/api/experimental/web_search", account.web_search, "POST"),
            r("/api/experimental/web_fetch", account.web_fetch, "POST"),
            r("/api/experimental/model-recommendations", account.recommendations, "GET"),
            r("/v1/chat/completions", v1.chat_completions, "POST", watch=True, openai=True),
            r("/v1/completions", v1.completions, "POST", watch=True, openai=True),
            r("/v1/embeddings", v1.v1_embeddings, "POST", watch=True, openai=True),
            r("/v1/responses", responses.responses, "POST", watch=True, openai=True),
            r("/v1/audio/transcriptions", compat.transcriptions, "POST", watch=True, openai=True),
            r("/v1/messages", messages.messages, "POST", watch=True, anthropic=True),
            r("/v1/models", v1.list_models, "GET", openai=True),
            r("/v1/models/{model}", v1.retrieve_model, "GET", openai=True),
            r("/_sim/stats", control.stats, "GET", internal=True),
            r("/_sim/faults", control.faults, "GET", "PUT", internal=True),
            r("/_sim/config", control.config, "GET", "PUT", internal=True),
            r("/_sim/reset", control.reset, "POST", internal=True),
            r("/_sim/unload", control.unload, "POST", internal=True),
            r("/_sim/dcgm", control.dcgm, "GET", internal=True),
        ]
    )


_ROUTES = _table()
# Routes with one path parameter that, like Gin's ":param", never spans a "/".
_PARAM_ROUTES = (
    ("/api/blobs/", "/api/blobs/{digest}"),
    ("/v1/models/", "/v1/models/{model}"),
    ("/api/user/keys/", "/api/user/keys/{key}"),
)
_BODY_METHODS = frozenset(("POST", "PUT", "DELETE", "PATCH"))
_INTERNAL = RequestRecord("/_sim", "", None, "")


class SimApp:
    """The simulated Ollama server. ``config`` is live: change it (or ``config.faults``) and the
    next request sees the change. ``sim`` holds the models, runners and stats."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.sim = Sim(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        param = ""
        methods = _ROUTES.get(path)
        if methods is None:
            for prefix, name in _PARAM_ROUTES:
                if (
                    path.startswith(prefix)
                    and len(path) > len(prefix)
                    and "/" not in path[len(prefix) :]
                ):
                    methods, param = _ROUTES[name], path[len(prefix) :]
                    break
        if methods is None:
            await _plain(send, 404, b"404 page not found")
            return
        route = methods.get(scope["method"])
        if route is None:
            await _plain(send, 405, b"405 method not allowed")
            return
        if route.internal:
            await self._internal(route, scope, receive, send)
            return
        host, request_id = "", None
        for key, value in scope["headers"]:
            if key == b"host":
                host = value.decode("latin-1")
            elif key == b"x-request-id":
                request_id = value.decode("latin-1")
        if self.config.check_host and not host_allowed(host):
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        client = scope.get("client")
        stats = self.sim.stats
        record = stats.begin(
            route.name, host, request_id, f"{client[0]}:{client[1]}" if client else ""
        )
        ex = Exchange(scope, receive, send, record, route.shape)
        ex.param = param
        try:
            if scope["method"] in _BODY_METHODS:
                ex.raw = await ex.body()
                if route.shape != "ollama" and _zstd(scope):
                    try:  # Ollama decodes zstd bodies on its /v1 routes
                        ex.raw = zstd_decoded(ex.raw, 64 * 1024 * 1024)
                    except ValueError as exc:
                        raise HTTPError(400, str(exc)) from None
            if route.watch:
                ex.watch_disconnect()
            await route.handler(self.sim, ex)
        except HTTPError as exc:
            await ex.error(exc.status, exc.message)
        except ClientGone:
            _cancelled(ex)
        except asyncio.CancelledError:
            if not ex.disconnected:
                raise
            # Our own watcher cancelled us: the client is gone. Undo that cancellation, but
            # let any other (server shutdown) cancellation through.
            task = asyncio.current_task()
            if task is not None and task.uncancel() > 0:
                raise
            _cancelled(ex)
        except Exception as exc:
            # A simulator bug (or the drop fault outside uvicorn): count it, let the server
            # answer 500 or close the connection.
            record.status = record.status or 500
            record.error = record.error or repr(exc)
            raise
        finally:
            ex.stop_watching()
            stats.end(record)

    async def _internal(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(scope, receive, send, _INTERNAL)
        try:
            if scope["method"] in _BODY_METHODS:
                ex.raw = await ex.body()
            await route.handler(self.sim, ex)
        except HTTPError as exc:
            await ex.error(exc.status, exc.message)
        except ClientGone:
            pass


def _zstd(scope: Scope) -> bool:
    return any(k == b"content-encoding" and v == b"zstd" for k, v in scope["headers"])


def host_allowed(host_header: str) -> bool:
    """Ollama's ``allowedHostsMiddleware`` for a loopback listener: localhost, loopback,
    private or unspecified IPs, the machine's hostname and ``*.localhost|local|internal``."""
    host = host_header.lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("", "localhost", socket.gethostname().lower()):
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified


def _cancelled(ex: Exchange) -> None:
    ex.record.cancelled = True
    if not ex.started:
        # What Ollama answers a client gone while queued or loading; nobody reads it.
        ex.record.status = 499
        ex.record.error = "request canceled"


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_sim_app(config: SimConfig | None = None) -> SimApp:
    """A simulated Ollama server as an ASGI app (``SimConfig()`` defaults when None)."""
    return SimApp(config if config is not None else SimConfig())
