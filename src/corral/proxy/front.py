"""The Ollama and OpenAI routes, served by a lean pure-ASGI handler in front of FastAPI.

Routed requests (inference, show) pick one backend and stream through; aggregated ones
(tags, ps, models, version) fan out to every healthy backend and merge.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import structlog

from corral.auth import ClientAuth, ClientKey, presented_key
from corral.balancer.admission import parse_priority
from corral.balancer.sessions import session_key
from corral.errors import ModelNotFoundError, NoBackendError, RoutingError
from corral.fleet.backends import BackendRegistry, normalize_model
from corral.metrics import Metrics
from corral.proxy.fanout import FanOut
from corral.proxy.forward import (
    HOP_BY_HOP,
    Forwarder,
    Message,
    Receive,
    ResponseCut,
    RouteSpec,
    Scope,
    Send,
    UpstreamStatusError,
)
from corral.upstream import Upstream

log = structlog.get_logger("corral.access")
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# path -> (route spec, default of "stream", model required message or None for 404 style)
ROUTED: dict[str, RouteSpec] = {
    "/api/generate": RouteSpec("generate"),
    "/api/chat": RouteSpec("chat"),
    "/api/embed": RouteSpec("embed"),
    "/api/embeddings": RouteSpec("embeddings"),
    "/api/show": RouteSpec("show"),
    "/v1/chat/completions": RouteSpec("v1_chat", openai=True),
    "/v1/completions": RouteSpec("v1_completions", openai=True),
    "/v1/embeddings": RouteSpec("v1_embeddings", openai=True),
}
# Routes where Ollama answers a missing model with 400 "model is required" (else 404).
_MODEL_REQUIRED = {"/api/chat", "/api/show"}
AGGREGATED = {"/api/tags": ("GET", "HEAD"), "/api/ps": ("GET",), "/v1/models": ("GET",)}
MANAGEMENT = {
    "/api/pull": ("POST",),
    "/api/push": ("POST",),
    "/api/create": ("POST",),
    "/api/copy": ("POST",),
    "/api/delete": ("DELETE",),
}
# A request still running after this long starts listening for the client going away.
_WATCH_AFTER_S = 0.05
_JSON = (b"content-type", b"application/json; charset=utf-8")
_TEXT = (b"content-type", b"text/plain; charset=utf-8")


# Request ids: a random per-process prefix plus a counter (unique, and no syscall per request).
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count(1)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is sane, else a new one."""
    text = _header(scope, b"x-request-id")
    # ASCII only: other bytes would not come back (nor reach the backend) as they were sent.
    if text is not None and 0 < len(text) <= 128 and text.isascii() and text.isprintable():
        return text
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    head: bool = False,
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def error_body(message: str, *, openai: bool, status: int) -> bytes:
    if openai:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        payload: dict[str, Any] = {
            "error": {"message": message, "type": kind, "param": None, "code": None}
        }
    else:
        payload = {"error": message}
    return json.dumps(payload, separators=(",", ":")).encode()


class OllamaFront:
    """Pure-ASGI handler for the Ollama/OpenAI surface; everything else goes to ``fallback``."""

    def __init__(
        self,
        *,
        fallback: ASGIApp,
        forwarder: Forwarder,
        registry: BackendRegistry,
        upstream: Upstream,
        metrics: Metrics,
        fanout: FanOut,
        clients: ClientAuth,
        max_body_bytes: int,
        aggregate_timeout_s: float,
    ) -> None:
        self.fallback = fallback
        self.forwarder = forwarder
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.fanout = fanout
        self.clients = clients
        self.max_body_bytes = max_body_bytes
        self.aggregate_timeout_s = aggregate_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if self.clients.enabled and _protected(path) and not await self._admit(scope, send):
            return
        spec = ROUTED.get(path)
        if spec is not None:
            if method != "POST":
                await _method_not_allowed(send)
                return
            await self.routed(scope, receive, send, spec)
            return
        if path in AGGREGATED:
            if method not in AGGREGATED[path]:
                await _method_not_allowed(send)
                return
            await self.aggregated(scope, send, path)
            return
        if path in ("/", "/api/version"):
            if method not in ("GET", "HEAD"):
                await _method_not_allowed(send)
                return
            if path == "/":
                await send_bytes(send, 200, b"Ollama is running", [_TEXT], head=method == "HEAD")
            else:
                await self.version(send, head=method == "HEAD")
            return
        if path.startswith("/v1/models/"):
            if method != "GET":
                await _method_not_allowed(send)
                return
            await self.retrieve_model(scope, receive, send, path[len("/v1/models/") :])
            return
        allowed: tuple[str, ...] | None = MANAGEMENT.get(path)
        if allowed is None and path.startswith("/api/blobs/"):
            allowed = ("HEAD", "POST")
        if allowed is not None:
            if method not in allowed:
                await _method_not_allowed(send)
                return
            request_id = _request_id(scope)
            await self.fanout.handle(
                scope,
                receive,
                send,
                request_id=request_id,
                headers=_forward_headers(scope, request_id),
                read_body=lambda: self._read_body(scope, receive, send, False),
            )
            return
        await self.fallback(scope, receive, send)

    # Routed ---------------------------------------------------------------------------------

    async def routed(self, scope: Scope, receive: Receive, send: Send, spec: RouteSpec) -> None:
        started = time.perf_counter()
        request_id = _request_id(scope)
        openai = spec.openai
        body = await self._read_body(scope, receive, send, openai)
        if body is None:
            return
        if not body:
            await self._fail(send, 400, "missing request body", openai, request_id)
            return
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            await self._fail(send, 400, f"invalid JSON: {exc}", openai, request_id)
            return
        if not isinstance(data, dict):
            await self._fail(send, 400, "request body must be a JSON object", openai, request_id)
            return
        model = data.get("model")
        if model is None and spec.name == "show":
            model = data.get("name")
        if not isinstance(model, str) or not model.strip():
            if model is not None and not isinstance(model, str):
                msg = "invalid model name"
                await self._fail(send, 400, msg, openai, request_id)
            elif openai or scope["path"] in _MODEL_REQUIRED:
                await self._fail(send, 400, "model is required", openai, request_id)
            else:
                await self._fail(send, 404, "model '' not found", openai, request_id)
            return
        session = session_key(_header(scope, b"x-session-id"), spec.name, data)
        options = data.get("options")
        num_ctx = options.get("num_ctx") if isinstance(options, dict) else None
        if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx <= 0:
            num_ctx = None  # absent or invalid: Ollama's default (it answers a bad one itself)
        await self._dispatch(
            scope,
            receive,
            send,
            spec,
            body,
            model,
            request_id,
            started,
            "POST",
            scope["path"],
            session,
            num_ctx,
        )

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        spec: RouteSpec,
        body: bytes | None,
        model: str,
        request_id: str,
        started: float,
        method: str,
        path: str,
        session: str | None = None,
        num_ctx: int | None = None,
    ) -> None:
        openai = spec.openai
        try:
            priority = _header(scope, b"x-priority")
            client: ClientKey | None = scope.get("corral.client")
            if priority is None and client is not None and client.priority is not None:
                rank = client.priority  # the key's default
            else:
                rank = parse_priority(priority)
        except ValueError as exc:
            await self._fail(send, 400, str(exc), openai, request_id)
            return
        headers = _forward_headers(scope, request_id)
        task = asyncio.current_task()
        assert task is not None
        gone = False

        def on_disconnect(watch: asyncio.Task[None]) -> None:
            nonlocal gone
            if not watch.cancelled() and watch.exception() is None:
                gone = True
                task.cancel()

        watcher: asyncio.Task[None] | None = None

        def arm() -> None:
            # Short requests finish before this fires and never pay for a watcher task.
            nonlocal watcher
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
            watcher.add_done_callback(on_disconnect)

        armed = asyncio.get_running_loop().call_later(_WATCH_AFTER_S, arm)
        status = 499
        backend_id: str | None = None
        fields: dict[str, Any] = {}
        try:
            status, backend_id, fields = await self.forwarder.forward(
                send,
                method=method,
                path=path,
                headers=headers,
                body=body,
                model=model,
                model_key=normalize_model(model),
                route=spec,
                request_id=request_id,
                extra_headers=[],
                rank=rank,
                session=session,
                num_ctx=num_ctx,
            )
        except RoutingError as exc:
            status = exc.status
            if isinstance(exc, UpstreamStatusError):
                ctype = exc.content_type or "application/json; charset=utf-8"
                payload = exc.payload or error_body(str(exc), openai=openai, status=status)
                backend_id = exc.backend_id
                extra = [(b"content-type", ctype.encode())]
                if backend_id:
                    extra.append((b"x-corral-backend", backend_id.encode()))
                if exc.busy:
                    extra.append((b"retry-after", b"1"))
                await send_bytes(
                    send, status, payload, [*extra, (b"x-request-id", request_id.encode())]
                )
            else:
                extra = []
                if isinstance(exc, NoBackendError):
                    extra.append((b"retry-after", str(exc.retry_after_s).encode()))
                await self._fail(send, status, str(exc), openai, request_id, extra)
            fields["error"] = str(exc)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
            status = 499
            fields["error"] = "client disconnected"
        except ResponseCut as exc:
            # Returning without finishing the response makes the server close the connection:
            # the client sees a truncated body, as nginx would give it, and no traceback.
            status = 502
            fields["error"] = str(exc)
        finally:
            armed.cancel()
            if watcher is not None:
                watcher.remove_done_callback(on_disconnect)
                watcher.cancel()
            duration = time.perf_counter() - started
            self._observe(spec, model, status, backend_id, duration, fields)
            if client is not None:
                fields["client"] = client.name  # the key's name; keys are never logged
            log.info(
                "request",
                request_id=request_id,
                route=spec.name,
                model=model,
                backend=backend_id,
                status=status,
                duration_s=round(duration, 6),
                **fields,
            )

    async def _admit(self, scope: Scope, send: Send) -> bool:
        """Client keys are on: the request must carry one (or the admin key), within its rate."""
        openai = scope["path"].startswith("/v1/")
        presented = presented_key(_header(scope, b"x-api-key"), _header(scope, b"authorization"))
        client = self.clients.identify(presented)
        if client is None:
            self.metrics.child(self.metrics.rejections, "unauthorized").inc()
            message = "missing API key" if presented is None else "invalid API key"
            extra = [(b"www-authenticate", b"Bearer")]
            await self._fail(send, 401, message, openai, _request_id(scope), extra)
            return False
        wait = self.clients.retry_after(client)
        if wait is not None:
            self.metrics.child(self.metrics.rejections, "rate_limited").inc()
            extra = [(b"retry-after", str(wait).encode())]
            message = f"rate limit of client key '{client.name}' exceeded"
            await self._fail(send, 429, message, openai, _request_id(scope), extra)
            return False
        scope["corral.client"] = client
        return True

    def _observe(
        self,
        spec: RouteSpec,
        model: str,
        status: int,
        backend_id: str | None,
        duration: float,
        fields: dict[str, Any],
    ) -> None:
        m = self.metrics
        backend = backend_id or "none"
        # Only models some backend reports become label values (bounded cardinality).
        label_model = model if normalize_model(model) in self.registry.known_models else "other"
        m.child(m.requests, backend, spec.name, label_model, str(status)).inc()
        if backend_id is None:
            return
        m.child(m.request_duration, backend, spec.name).observe(duration)
        ttft = fields.get("ttft_s")
        if ttft is not None:
            m.child(m.ttft, backend, spec.name).observe(ttft)
        tokens = fields.get("tokens")
        if tokens:
            m.child(m.tokens, backend, label_model).inc(tokens)

    async def _read_body(
        self, scope: Scope, receive: Receive, send: Send, openai: bool
    ) -> bytes | None:
        limit = self.max_body_bytes
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._too_large(send, openai, scope)
                    return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    await self._too_large(send, openai, scope)
                    return None
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _too_large(self, send: Send, openai: bool, scope: Scope) -> None:
        mb = self.max_body_bytes / 1_000_000
        msg = f"request body too large: the limit is {mb:g} MB (server.max_body_mb)"
        await self._fail(send, 413, msg, openai, _request_id(scope), [(b"connection", b"close")])

    async def _fail(
        self,
        send: Send,
        status: int,
        message: str,
        openai: bool,
        request_id: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [_JSON, (b"x-request-id", request_id.encode()), *(extra or [])]
        await send_bytes(send, status, error_body(message, openai=openai, status=status), headers)

    # /v1/models/{model} ---------------------------------------------------------------------

    async def retrieve_model(self, scope: Scope, receive: Receive, send: Send, model: str) -> None:
        request_id = _request_id(scope)
        if not model or "/" in model:
            await send_bytes(send, 404, b"404 page not found", [_TEXT])
            return
        spec = RouteSpec("v1_models_retrieve", openai=True)
        await self._dispatch(
            scope,
            receive,
            send,
            spec,
            None,
            model,
            request_id,
            time.perf_counter(),
            "GET",
            scope["path"],
        )

    # Aggregated -----------------------------------------------------------------------------

    async def _fan_out(self, path: str) -> list[tuple[str, Any]]:
        now = time.monotonic()
        backends = [b for b in self.registry.all() if b.available(now)]
        if not backends:
            raise NoBackendError("no healthy backend available")

        async def one(url: str) -> Any:
            try:
                return await self.upstream.get_json(url + path, self.aggregate_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                return None

        results = await asyncio.gather(*(one(b.url) for b in backends))
        return [(b.id, r) for b, r in zip(backends, results, strict=True) if r is not None]

    async def aggregated(self, scope: Scope, send: Send, path: str) -> None:
        openai = path.startswith("/v1/")
        request_id = _request_id(scope)
        try:
            results = await self._fan_out("/api/tags" if path == "/v1/models" else path)
        except NoBackendError as exc:
            extra = [(b"retry-after", str(exc.retry_after_s).encode())]
            await self._fail(send, 503, str(exc), openai, request_id, extra)
            return
        if path == "/api/ps":
            payload: dict[str, Any] = {"models": merge_ps(results)}
        else:
            models = merge_tags(results)
            payload = {"models": models} if path == "/api/tags" else openai_models(models)
        body = json.dumps(payload, separators=(",", ":")).encode()
        answered = ",".join(backend_id for backend_id, _ in results).encode()
        headers = [_JSON, (b"x-request-id", request_id.encode()), (b"x-corral-backend", answered)]
        await send_bytes(send, 200, body, headers, head=scope["method"] == "HEAD")

    async def version(self, send: Send, *, head: bool) -> None:
        versions = [v for _, v in await self._safe_fan_out("/api/version")]
        found = [
            str(v.get("version")) for v in versions if isinstance(v, dict) and v.get("version")
        ]
        version = min(found, key=version_key) if found else "0.0.0"
        body = json.dumps({"version": version}, separators=(",", ":")).encode()
        await send_bytes(send, 200, body, [_JSON], head=head)

    async def _safe_fan_out(self, path: str) -> list[tuple[str, Any]]:
        try:
            return await self._fan_out(path)
        except NoBackendError:
            return []


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


def _forward_headers(scope: Scope, request_id: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key in HOP_BY_HOP or key in (b"authorization", b"x-api-key"):
            continue
        headers[key.decode("latin-1")] = value.decode("latin-1")
    headers["X-Request-ID"] = request_id
    return headers


def _protected(path: str) -> bool:
    """Routes that need a client key when client keys are on (``/`` and the version stay open
    for liveness checks)."""
    return (
        path in ROUTED
        or path in AGGREGATED
        or path in MANAGEMENT
        or path.startswith(("/v1/models/", "/api/blobs/"))
    )


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _method_not_allowed(send: Send) -> None:
    await send_bytes(send, 405, b"405 method not allowed", [_TEXT])


__all__ = ["ROUTED", "ModelNotFoundError", "OllamaFront"]
