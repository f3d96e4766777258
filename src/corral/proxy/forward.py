"""Forwarder: send a routed request upstream, stream it back, fail over before the first byte."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from corral.balancer.admission import Admission
from corral.balancer.routing import demand_key
from corral.config import BalancerSettings
from corral.errors import NoBackendError, RoutingError, UpstreamError
from corral.fleet.backends import BackendRegistry, BackendState
from corral.fleet.health import HealthChecker
from corral.metrics import Metrics
from corral.upstream import TRANSPORT_ERRORS, Upstream

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = structlog.get_logger("corral.access")

# Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus the ones
# corral sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
        b"x-request-id",
        b"x-priority",
        b"x-api-key",
    }
)
_RESPONSE_SKIP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "date", "server"}
)
_EVAL_COUNT = re.compile(rb'"(?:eval_count|completion_tokens)":\s*(\d+)')
# Ollama's final-chunk metrics (OpenAI usage) that tell corral how the backend served.
_FINAL_STATS = re.compile(
    rb'"(load_duration|prompt_eval_count|prompt_eval_cached_count|prompt_eval_duration'
    rb'|prompt_tokens|cached_tokens)":\s*(\d+)'
)
_BUSY = b"server busy"


@dataclass(slots=True)
class RouteSpec:
    """A routed endpoint: its metric label and how errors are shaped."""

    name: str
    openai: bool = False


class RetryBudget:
    """A token bucket that keeps retries to ``ratio`` of requests (Finagle's RetryBudget).

    Every request deposits ``ratio`` of a token; every retry withdraws one. ``min_per_s``
    tokens per second trickle in regardless, so a quiet service can still retry. Under a
    failure storm the bucket empties and traffic to backends stays near 1 + ratio times
    the client's, instead of ``max_attempts`` times.
    """

    def __init__(
        self, ratio: float, min_per_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self._clock = clock
        # Room for a burst: ten seconds of the floor, or ten retries.
        self.capacity = max(10.0, 10.0 * min_per_s)
        self.tokens = self.capacity
        self._last = clock()

    def deposit(self) -> None:
        """A request arrived."""
        self.tokens = min(self.capacity, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        """Spend one retry; False when the budget is exhausted."""
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.min_per_s)
        self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ResponseCut(Exception):
    """The backend died in the middle of a plain (non-streaming) body: only an abort is left."""


def ndjson_error(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode() + b"\n"


def sse_error(message: str) -> bytes:
    payload = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Forwarder:
    """Places one request on a backend and relays the response unbuffered."""

    def __init__(
        self,
        registry: BackendRegistry,
        admission: Admission,
        upstream: Upstream,
        health: HealthChecker,
        metrics: Metrics,
        settings: BalancerSettings,
    ) -> None:
        self.registry = registry
        self.admission = admission
        self.upstream = upstream
        self.health = health
        self.metrics = metrics
        self.settings = settings
        self.budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min)
        self.router = admission.router
        self.demand = admission.router.demand

    def _learn(
        self, backend: BackendState, model_key: str | None, stats: dict[str, int], cold: bool
    ) -> None:
        """What the final chunk says of the backend: prompt tokens and cache hits (counted),
        its load speed (after a cold load) and its prefill speed."""
        prompt = stats.get("prompt_eval_count", stats.get("prompt_tokens", 0))
        cached = stats.get("prompt_eval_cached_count", stats.get("cached_tokens", 0))
        if prompt:
            self.metrics.child(self.metrics.prompt_tokens, backend.id).inc(prompt)
            if cached:
                self.metrics.child(self.metrics.prompt_tokens_cached, backend.id).inc(
                    min(cached, prompt)
                )
        prefill_ns = stats.get("prompt_eval_duration", 0)
        if prefill_ns and prompt > cached:
            self.demand.observe_prefill(backend.id, prompt - cached, prefill_ns / 1e9)
        load_ns = stats.get("load_duration", 0)
        if cold and model_key is not None and load_ns > 250_000_000:
            size = self.router.model_size(model_key)
            if size:
                self.demand.observe_load(backend.id, size, load_ns / 1e9)

    async def forward(
        self,
        send: Send,
        *,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        model: str,
        model_key: str | None,
        route: RouteSpec,
        request_id: str,
        extra_headers: list[tuple[bytes, bytes]],
        rank: int = 1,
        session: str | None = None,
        num_ctx: int | None = None,
    ) -> tuple[int, str | None, dict[str, Any]]:
        """Serve the request; returns (status, backend id, log fields). Raises RoutingError
        only while nothing has been sent to the client."""
        started = time.perf_counter()
        self.budget.deposit()
        # 5xx answers wait to be counted against their backend: when a second backend answers
        # the same request with the same error, the request is at fault (Ollama answers some
        # bad requests with 500), and neither backend is blamed nor the request tried again.
        refused: list[tuple[BackendState, UpstreamStatusError]] = []
        try:
            tried: list[str] = []
            attempts = 0
            budget = self.budget
            last_error: RoutingError | None = None
            enqueued = time.monotonic()
            while attempts < self.settings.max_attempts:
                try:
                    # A retry keeps its place in the queue and jumps one class ahead.
                    backend = await self.admission.acquire(
                        model,
                        model_key,
                        route.name,
                        tried,
                        rank=rank + (1 if attempts else 0),
                        enqueued=enqueued,
                        session=session,
                        num_ctx=num_ctx,
                    )
                except RoutingError as exc:
                    if last_error is not None and isinstance(exc, NoBackendError):
                        raise last_error from None
                    raise
                attempts += 1
                tried.append(backend.id)
                # Admission counted the request for its model there when it granted the slot.
                key = demand_key(model_key, route.name)
                cold = key is not None and key not in backend.resident
                held_s: float | None = None
                dispatched = time.perf_counter()
                try:
                    outcome = await self._attempt(
                        send,
                        backend,
                        method,
                        path,
                        headers,
                        body,
                        route,
                        request_id,
                        extra_headers,
                        started,
                        can_retry=attempts < self.settings.max_attempts,
                    )
                    if isinstance(outcome, tuple):
                        held_s = time.perf_counter() - dispatched
                finally:
                    self.admission.release(backend, key, held_s)
                    self.metrics.child(self.metrics.slot_utilization, backend.id).set(
                        backend.in_flight / backend.max_concurrent
                    )
                if isinstance(outcome, tuple):
                    status, fields = outcome
                    fields["attempts"] = attempts
                    stats = fields.pop("stats", None)
                    if stats:
                        self._learn(backend, key, stats, cold)
                        if session is not None:
                            prompt = stats.get("prompt_eval_count", stats.get("prompt_tokens", 0))
                            self.router.note_context(session, prompt + fields["tokens"])
                    return status, backend.id, fields
                # A retryable failure before any byte reached the client.
                last_error = outcome
                if isinstance(outcome, UpstreamStatusError) and not outcome.busy:
                    same = [b for b, e in refused if _alike(e, outcome)]
                    if same:
                        for b in same:
                            refused.remove(next(r for r in refused if r[0] is b))
                        log.info(
                            "backends refused the request alike; not counted against them",
                            request_id=request_id,
                            status=outcome.status,
                            error=str(outcome),
                            backends=[backend.id, *(b.id for b in same)],
                        )
                        break
                    refused.append((backend, outcome))
                if isinstance(outcome, _Timeout):
                    break  # the backend may still be generating: a retry would double the work
                if attempts >= self.settings.max_attempts or not budget.withdraw():
                    break
                self.metrics.retries.labels(reason=_reason(outcome)).inc()
            assert last_error is not None
            raise last_error
        finally:
            for backend, _ in refused:
                self.health.record_result(backend, False)

    async def _attempt(
        self,
        send: Send,
        backend: BackendState,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        route: RouteSpec,
        request_id: str,
        extra_headers: list[tuple[bytes, bytes]],
        started: float,
        *,
        can_retry: bool,
    ) -> tuple[int, dict[str, Any]] | RoutingError:
        metrics = self.metrics
        in_flight = metrics.child(metrics.in_flight, backend.id)
        utilization = metrics.child(metrics.slot_utilization, backend.id)
        # The slot was reserved by admission; forward() releases it in every path.
        in_flight.inc()
        utilization.set(backend.in_flight / backend.max_concurrent)
        dispatched = time.perf_counter()  # the backend's own times start here, not in the queue
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                resp = await self.upstream.open(method, backend.url + path, headers, body)
            except aiohttp.ConnectionTimeoutError as exc:
                # Never connected, so nothing was sent: as safe to retry as a refused connect.
                # (It is a TimeoutError too, so it must be caught before the clause below.)
                self.health.record_result(backend, False, transport=True)
                return _Transport(f"backend {backend.id} unreachable: {_describe(exc)}")
            except TimeoutError:
                # Sent but no answer in first_token_s: retrying would double GPU work.
                self.health.record_result(backend, False)
                return _Timeout(f"backend {backend.id} did not answer in time", 504)
            except TRANSPORT_ERRORS as exc:
                self.health.record_result(backend, False, transport=True)
                return _Transport(f"backend {backend.id} unreachable: {_describe(exc)}")
            status = resp.status
            if status >= 500 and can_retry:
                payload = await _read_small(resp)
                busy = status == 503 and _BUSY in payload
                # Not counted here: forward() decides, once it knows whether it was the request.
                return UpstreamStatusError(
                    status, payload, resp.headers.get("Content-Type", ""), busy, backend.id
                )
            return await self._relay(
                send, backend, resp, route, request_id, extra_headers, started, dispatched
            )
        finally:
            in_flight.dec()
            if resp is not None:
                resp.close()

    async def _relay(
        self,
        send: Send,
        backend: BackendState,
        resp: aiohttp.ClientResponse,
        route: RouteSpec,
        request_id: str,
        extra_headers: list[tuple[bytes, bytes]],
        started: float,
        dispatched: float,
    ) -> tuple[int, dict[str, Any]] | RoutingError:
        status = resp.status
        content = resp.content
        # Hold the status line back until the first body byte: a backend that dies before it
        # can still be retried elsewhere, since the client has seen nothing yet.
        try:
            first = await content.readany()
        except TimeoutError:
            self.health.record_result(backend, False)
            return _Timeout(f"backend {backend.id} sent headers but no body in time", 504)
        except TRANSPORT_ERRORS as exc:
            self.health.record_result(backend, False, transport=True)
            return _Transport(f"backend {backend.id} failed before its body: {_describe(exc)}")
        out_headers = [
            (k.lower(), v)
            for k, v in resp.raw_headers
            if k.decode("latin-1").lower() not in _RESPONSE_SKIP
        ]
        out_headers.append((b"x-corral-backend", backend.id.encode()))
        out_headers.append((b"x-request-id", request_id.encode()))
        out_headers.extend(extra_headers)
        content_type = resp.headers.get("Content-Type", "")
        first_at = time.perf_counter()
        ttft = first_at - started  # as the client saw it, queueing included
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        # The last chunk closes the response in the same write (one syscall fewer).
        ended = not first or content.is_eof()
        tail = first[-768:]
        # Streams go out in whole lines, so that the error line sent if the backend dies in
        # the middle of one is not glued to half a line no client can parse.
        ndjson, sse = "ndjson" in content_type, "event-stream" in content_type
        held = b""
        if ndjson or sse:
            first, held = _whole_lines(first, ended)
        await send({"type": "http.response.body", "body": first, "more_body": not ended})
        error: str | None = None
        try:
            if not ended:
                async for chunk in content.iter_any():
                    tail = tail[-256:] + chunk if len(chunk) < 512 else chunk
                    ended = content.is_eof()
                    if ndjson or sse:
                        chunk, held = _whole_lines(held + chunk if held else chunk, ended)
                    await send(
                        {"type": "http.response.body", "body": chunk, "more_body": not ended}
                    )
        except TimeoutError:
            error = f"backend {backend.id} stalled: no data for {self.upstream.timeouts.idle_s:g}s"
        except TRANSPORT_ERRORS as exc:
            error = f"backend {backend.id} failed mid-stream: {_describe(exc)}"
        ok = error is None and status < 500
        if held and error is None:
            await send({"type": "http.response.body", "body": held, "more_body": True})
        if error is not None:
            self.health.record_result(backend, False, transport=True)
            if ndjson:
                await send(
                    {"type": "http.response.body", "body": ndjson_error(error), "more_body": True}
                )
            elif sse:
                # The blank line first ends an event whose data line went out without its own.
                body = b"\n" + sse_error(error)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            else:
                # A plain body cut short cannot carry an error: abort the connection.
                raise ResponseCut(error)
        elif status != 503 or _BUSY not in tail:
            self.health.record_result(backend, ok)
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        now = time.perf_counter()
        tokens = 0
        stats: dict[str, int] = {}
        if ok and status == 200:
            counts = _EVAL_COUNT.findall(tail)
            if counts:
                tokens = int(counts[-1])
            stats = {k.decode(): int(v) for k, v in _FINAL_STATS.findall(tail)}
            # The backend's speed: from dispatch, so time spent in corral's queue (no fault of
            # this backend's) does not make it look slow to least_response_time and score.
            backend.ttft.observe(first_at - dispatched)
        served = now - dispatched
        backend.last_response_time = served
        prev = backend.avg_response_time
        backend.avg_response_time = served if prev is None else prev * 0.9 + served * 0.1
        fields: dict[str, Any] = {"ttft_s": round(ttft, 6), "tokens": tokens}
        if ok and status == 200 and stats:
            fields["stats"] = stats
        if error is not None:
            fields["error"] = error
        return (status if error is None else 502), fields


class _Failure(RoutingError):
    retry_reason = "error"


class _Transport(_Failure):
    status = 502
    retry_reason = "connect"


class _Timeout(_Failure):
    retry_reason = "timeout"

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


class UpstreamStatusError(_Failure):
    """The backend answered 5xx before any byte reached the client."""

    def __init__(
        self, status: int, payload: bytes, content_type: str, busy: bool, backend_id: str
    ) -> None:
        self.backend_id = backend_id
        self.status = status
        self.payload = payload
        self.content_type = content_type
        self.busy = busy
        self.retry_reason = "busy" if busy else "status_5xx"
        super().__init__(_error_text(payload) or f"backend answered {status}")


# Longer than any line Ollama streams: relayed as it comes rather than held in memory.
_MAX_HELD = 65536


def _whole_lines(data: bytes, ended: bool) -> tuple[bytes, bytes]:
    """What of a stream to relay now: ``data`` up to its last newline, and the unfinished line
    held back for the next chunk (none once the stream ended, or when absurdly long)."""
    if ended or data.endswith(b"\n"):
        return data, b""
    cut = data.rfind(b"\n") + 1
    if len(data) - cut > _MAX_HELD:
        return data, b""
    return data[:cut], data[cut:]


def _alike(a: UpstreamStatusError, b: UpstreamStatusError) -> bool:
    """Two backends refused a request the same way (same status, same error text)."""
    return (a.status, str(a)) == (b.status, str(b))


def _reason(err: RoutingError) -> str:
    return getattr(err, "retry_reason", "error")


def _error_text(payload: bytes) -> str:
    try:
        data = json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace").strip()[:300]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return str(err.get("message", ""))
        if err:
            return str(err)
    return ""


async def _read_small(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await asyncio.wait_for(resp.content.read(65536), 5)
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        return b""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


__all__ = [
    "Forwarder",
    "ResponseCut",
    "RetryBudget",
    "RouteSpec",
    "UpstreamError",
    "UpstreamStatusError",
    "ndjson_error",
    "sse_error",
]
