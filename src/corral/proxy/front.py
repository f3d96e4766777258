"""The front door: a route table for the Ollama and OpenAI surface, in front of FastAPI.

A request is looked up by path: routed inference (one backend, streamed through), listings
merged from every backend, fan-out model management, or anything else, which goes to the
FastAPI app (admin API, health, metrics, docs). The 404 and 405 answers of the Ollama surface
are given here, in Ollama's words. A routed request becomes one ``RoutedRequest`` here; the
``Forwarder`` fills one ``Result``; metrics and the access log read that result here, once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corral.asgi import (
    ASGIApp,
    BodyTooLargeError,
    DisconnectWatcher,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    form_field,
    header,
    request_id,
    zstd_decoded,
)
from corral.auth import ClientAuth, presented_key
from corral.balancer.admission import parse_priority
from corral.balancer.sessions import continues, session_key
from corral.errors import RequestError, RoutingError, UpstreamStatusError
from corral.fleet.backends import BackendRegistry, is_cloud, normalize_model, shown_name
from corral.logs import access_log
from corral.metrics import Metrics
from corral.proxy.bodies import Bodies, refusal_headers
from corral.proxy.fanout import FanOut
from corral.proxy.forward import Forwarder
from corral.proxy.listing import Listing
from corral.proxy.passthrough import ACCOUNT, ACCOUNT_PREFIX, WEB, Passthrough
from corral.proxy.relay import TEXT, Reply, method_not_allowed, not_found, send_bytes
from corral.proxy.request import Result, Route, RoutedRequest, forwarded_headers
from corral.shapes import Shape

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTED: dict[str, Route] = {
    "/api/generate": Route("generate"),
    "/api/chat": Route("chat", model_required=True),
    "/api/embed": Route("embed"),
    "/api/embeddings": Route("embeddings"),
    "/api/show": Route("show", model_required=True),
    "/v1/chat/completions": Route("v1_chat", "openai"),
    "/v1/completions": Route("v1_completions", "openai"),
    "/v1/embeddings": Route("v1_embeddings", "openai"),
    "/v1/responses": Route("v1_responses", "openai", events=True),
    "/v1/messages": Route("v1_messages", "anthropic", events=True),
}
AGGREGATED = {"/api/tags": ("GET", "HEAD"), "/api/ps": ("GET",), "/v1/models": ("GET",)}
MANAGEMENT = {
    "/api/pull": ("POST",),
    "/api/push": ("POST",),
    "/api/create": ("POST",),
    "/api/copy": ("POST",),
    "/api/delete": ("DELETE",),
}
_RETRIEVE = Route("v1_models_retrieve", "openai")
TRANSCRIPTIONS = Route("v1_audio_transcriptions", "openai")
# An upload's own limit: OpenAI's for an audio file, whatever server.max_body_mb says.
AUDIO_MAX_BYTES = 25 * 1024 * 1024 + 64 * 1024  # 25 MiB of audio and the form around it


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of the route table."""

    methods: tuple[str, ...]
    handler: Handler
    keyed: bool = True  # needs a client key when client keys are on


def shape_of(path: str) -> Shape:
    """Whose API a path belongs to, for the shape of corral's own errors on it."""
    route = ROUTED.get(path)
    if route is not None:
        return route.shape
    return "openai" if path.startswith("/v1/") else "ollama"


class OllamaFront:
    """Pure-ASGI handler for the Ollama/OpenAI surface; everything else goes to ``fallback``."""

    def __init__(
        self,
        *,
        fallback: ASGIApp,
        forwarder: Forwarder,
        registry: BackendRegistry,
        listing: Listing,
        metrics: Metrics,
        fanout: FanOut,
        passthrough: Passthrough,
        clients: ClientAuth,
        bodies: Bodies,
        expose_backend: bool = True,
    ) -> None:
        self.fallback = fallback
        # server.expose_backend_header off: answers do not say which backend served them.
        self.expose_backend = expose_backend
        self.forwarder = forwarder
        self.registry = registry
        self.listing = listing
        self.metrics = metrics
        self.fanout = fanout
        self.clients = clients
        self.bodies = bodies
        self.table: dict[str, Entry] = {
            **{path: Entry(("POST",), self.routed) for path in ROUTED},
            **{path: Entry(methods, self.aggregated) for path, methods in AGGREGATED.items()},
            **{path: Entry(methods, self.manage) for path, methods in MANAGEMENT.items()},
            # Account routes need the admin key, checked by the handler: no client key.
            **{p: Entry(m, passthrough.account, keyed=False) for p, m in ACCOUNT.items()},
            **{path: Entry(methods, passthrough.web) for path, methods in WEB.items()},
            "/v1/audio/transcriptions": Entry(("POST",), self.transcription),
            "/": Entry(("GET", "HEAD"), self.root, keyed=False),
            "/api/version": Entry(("GET", "HEAD"), self.version, keyed=False),
        }
        # Path prefixes, tried in order when no exact path matched.
        self.prefixes: list[tuple[str, Entry]] = [
            ("/v1/models/", Entry(("GET",), self.retrieve_model)),
            ("/api/blobs/", Entry(("HEAD", "POST"), self.manage)),
            (ACCOUNT_PREFIX, Entry(("DELETE",), passthrough.account, keyed=False)),
        ]

    def entry(self, path: str) -> Entry | None:
        found = self.table.get(path)
        if found is None:
            for prefix, entry in self.prefixes:
                if path.startswith(prefix):
                    return entry
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        entry = self.entry(scope["path"])
        if not self.expose_backend:
            send = _without_backend_header(send)
        if entry is None:
            await self.fallback(scope, receive, send)
        elif entry.keyed and self.clients.enabled and not await self._admit(scope, send):
            return
        elif scope["method"] not in entry.methods:
            await method_not_allowed(send)
        else:
            await entry.handler(scope, receive, send)

    # Routed ---------------------------------------------------------------------------------

    async def routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        route = ROUTED[scope["path"]]
        rid = request_id(scope)
        reply = Reply(send, rid, route.shape, events=route.events)
        try:
            async with self.bodies.read(scope, receive) as body:
                if body is None:
                    return  # the client left
                request = self._parse(scope, route, body, rid, started)
                await self._serve(request, receive, reply)
        except RequestError as exc:  # before anything was sent
            await reply.error(exc.status, str(exc), refusal_headers(exc))

    def _parse(
        self, scope: Scope, route: Route, body: bytes, rid: str, started: float
    ) -> RoutedRequest:
        """The request as corral needs it; RequestError when it cannot be served."""
        if not body:
            raise RequestError("missing request body")
        text = body
        if route.shape != "ollama" and header(scope, b"content-encoding") == "zstd":
            # Ollama decodes zstd bodies on its /v1 routes: corral decodes to read the model
            # and forwards the bytes it got.
            try:
                text = zstd_decoded(body, self.bodies.limit)
            except BodyTooLargeError:
                raise self.bodies.too_large() from None
            except ValueError as exc:
                raise RequestError(str(exc)) from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise RequestError(f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RequestError("request body must be a JSON object")
        model = data.get("model")
        if model is None and route.name == "show":
            model = data.get("name")
        if not isinstance(model, str) or not model.strip():
            if model is not None and not isinstance(model, str):
                raise RequestError("invalid model name")
            if route.shape != "ollama" or route.model_required:
                raise RequestError("model is required")
            raise RequestError("model '' not found", 404)
        options = data.get("options")
        num_ctx = options.get("num_ctx") if isinstance(options, dict) else None
        if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx <= 0:
            num_ctx = None  # absent or invalid: Ollama's default (it answers a bad one itself)
        stream = data.get("stream")
        conversation = session_key(header(scope, b"x-session-id"), route.name, data)
        request = self._request(scope, route, rid, started, body, model, self._rank(scope))
        # Ollama's native routes stream unless told not to; OpenAI's and Anthropic's do not.
        request.stream = stream if isinstance(stream, bool) else route.shape == "ollama"
        if conversation is not None and (conversation[0] == "h" or continues(data)):
            request.session = conversation
        request.conversation = conversation
        request.num_ctx = num_ctx
        return request

    def _request(
        self,
        scope: Scope,
        route: Route,
        rid: str,
        started: float,
        body: bytes | None,
        model: str,
        rank: int,
    ) -> RoutedRequest:
        model = shown_name(model)  # a longer one matches no model: it is only shown
        return RoutedRequest(
            route=route,
            method=scope["method"],
            path=scope["path"],
            body=body,
            model=model,
            model_key=normalize_model(model),
            request_id=rid,
            headers=self._forward_headers(scope, rid),
            started=started,
            rank=rank,
            client=scope.get("corral.client"),
            cloud=is_cloud(model),
            remote_addr=peer[0] if (peer := scope.get("client")) else None,
        )

    async def _serve(self, request: RoutedRequest, receive: Receive, reply: Reply) -> None:
        """Forward, answer a failure before the first byte, then count and log, once."""
        result = Result()
        with DisconnectWatcher(receive) as watch:
            try:
                await self.forwarder.forward(request, reply, result)
            except RoutingError as exc:
                result.status, result.error = exc.status, str(exc)
                if isinstance(exc, UpstreamStatusError):
                    result.backend = exc.backend_id
                await reply.fail(exc)
        if watch.gone:
            result.status, result.error = 499, "client disconnected"
        self._record(request, result)

    def _record(self, request: RoutedRequest, result: Result) -> None:
        """Metrics and the access log of one routed request."""
        duration = time.perf_counter() - request.started
        route = request.route.name
        # Only models some backend reports become label values (bounded cardinality).
        known = request.model_key in self.registry.known_models
        label_model = self.metrics.model_label(request.model_key, known, request.cloud)
        self.metrics.observe_request(
            result.backend,
            route,
            label_model,
            result.status,
            duration,
            result.ttft_s,
            result.tokens,
        )
        fields: dict[str, object] = {
            "request_id": request.request_id,
            "route": route,
            "model": request.model,
            "backend": result.backend,
            "status": result.status,
            "duration_s": round(duration, 6),
        }
        if result.backend is not None and result.ttft_s is not None:
            fields["ttft_s"] = result.ttft_s
            fields["tokens"] = result.tokens
        if result.attempts:
            fields["attempts"] = result.attempts
        if result.error is not None:
            fields["error"] = result.error
        if request.client is not None:
            fields["client"] = request.client.name  # the key's name; keys are never logged
        if request.remote_addr is not None:
            fields["remote_addr"] = request.remote_addr
        access_log.request(fields)

    def _rank(self, scope: Scope) -> int:
        """The priority class: X-Priority, else the client key's default, else normal."""
        priority = header(scope, b"x-priority")
        client = scope.get("corral.client")
        if priority is None and client is not None and client.priority is not None:
            rank: int = client.priority
            return rank
        try:
            return parse_priority(priority)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    async def transcription(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/audio/transcriptions``: a multipart upload whose ``model`` field routes
        it, forwarded as it came."""
        started = time.perf_counter()
        rid = request_id(scope)
        reply = Reply(send, rid, "openai")
        limit = max(AUDIO_MAX_BYTES, self.bodies.limit)
        try:
            async with self.bodies.read(scope, receive, limit) as body:
                if body is None:
                    return
                model = form_field(body, header(scope, b"content-type") or "", "model")
                if not model or not model.strip():
                    raise RequestError("model is required")
                rank = self._rank(scope)
                request = self._request(scope, TRANSCRIPTIONS, rid, started, body, model, rank)
                request.stream = False
                await self._serve(request, receive, reply)
        except RequestError as exc:  # before anything was sent
            await reply.error(exc.status, str(exc), refusal_headers(exc))

    async def retrieve_model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/models/{model}``: routed to a backend that has the model."""
        model = scope["path"][len("/v1/models/") :]
        if not model or "/" in model:
            await not_found(send)
            return
        rid = request_id(scope)
        reply = Reply(send, rid, "openai")
        try:
            rank = self._rank(scope)
        except RequestError as exc:
            await reply.error(exc.status, str(exc))
            return
        request = self._request(scope, _RETRIEVE, rid, time.perf_counter(), None, model, rank)
        request.stream = False
        await self._serve(request, receive, reply)

    # Aggregated, version, root, management -------------------------------------------------------

    async def aggregated(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.listing.aggregated(scope, send, scope["path"], request_id(scope))

    async def version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.listing.version(send, head=scope["method"] == "HEAD")

    async def root(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, b"Ollama is running", [TEXT], head=scope["method"] == "HEAD")

    async def manage(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id(scope)
        held = self.bodies.read(scope, receive)  # held until the whole operation ends

        async def read_body() -> bytes | None:
            try:
                return await held.take()
            except RequestError as exc:
                await Reply(send, rid, "ollama").error(exc.status, str(exc), refusal_headers(exc))
                return None

        try:
            await self.fanout.handle(
                scope,
                receive,
                send,
                request_id=rid,
                headers=self._forward_headers(scope, rid),
                read_body=read_body,
            )
        finally:
            held.release()

    # The door's checks ------------------------------------------------------------------------

    async def _admit(self, scope: Scope, send: Send) -> bool:
        """Client keys are on: the request must carry one (or the admin key), within its rate."""
        reply = Reply(send, request_id(scope), shape_of(scope["path"]))
        presented = presented_key(header(scope, b"x-api-key"), header(scope, b"authorization"))
        client = self.clients.identify(presented)
        if client is None:
            self.metrics.child(self.metrics.rejections, "unauthorized").inc()
            message = "missing API key" if presented is None else "invalid API key"
            await reply.error(401, message, [(b"www-authenticate", b"Bearer")])
            return False
        if self.clients.shared is None:
            wait = self.clients.retry_after(client)
        else:
            wait = await self.clients.shared_retry_after(client)
        if wait is not None:
            self.metrics.child(self.metrics.rejections, "rate_limited").inc()
            message = f"rate limit of client key '{client.name}' exceeded"
            await reply.error(429, message, [(b"retry-after", str(wait).encode())])
            return False
        scope["corral.client"] = client
        return True

    @staticmethod
    def _forward_headers(scope: Scope, rid: str) -> Headers:
        return forwarded_headers(scope["headers"], rid)


def _without_backend_header(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message["headers"] if k != b"x-corral-backend"]
            message = {**message, "headers": kept}
        await send(message)

    return sending


__all__ = ["AGGREGATED", "MANAGEMENT", "ROUTED", "OllamaFront"]
