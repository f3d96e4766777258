"""Forwarder: one routed request down to a backend, one result back.

``forward`` loops over attempts; each attempt holds one slot (``admission.slot``) for as long
as it talks to its backend, raises a typed ``UpstreamError`` when the backend fails before the
client saw a byte (then the next attempt goes elsewhere, within the retry budget), and hands the
answer to the relay once it starts. What the attempt did to the backend's health is judged in
one place (:meth:`Forwarder._judge`), and what the answer taught about the backend in another
(:meth:`Forwarder._learn`).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from corral.balancer.admission import Admission
from corral.balancer.retry import RetryBudget
from corral.balancer.routing import demand_key
from corral.config import BalancerSettings
from corral.errors import (
    NoBackendError,
    RoutingError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamMalformedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from corral.fleet.backends import BackendState
from corral.fleet.health import HealthChecker
from corral.metrics import Metrics
from corral.proxy.relay import BUSY, Reply
from corral.proxy.request import Result, RoutedRequest
from corral.upstream import Upstream

log = structlog.get_logger("corral.access")


class Forwarder:
    """Places one request on a backend and relays the answer unbuffered."""

    def __init__(
        self,
        admission: Admission,
        upstream: Upstream,
        health: HealthChecker,
        metrics: Metrics,
        settings: BalancerSettings,
    ) -> None:
        self.admission = admission
        self.upstream = upstream
        self.health = health
        self.metrics = metrics
        self.settings = settings
        self.budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min)
        self.router = admission.router
        self.demand = admission.router.demand
        self.retries = 0  # requests tried again on another backend, since start

    async def forward(self, request: RoutedRequest, reply: Reply, result: Result) -> None:
        """Serve ``request`` and fill ``result``. Raises RoutingError only while nothing has
        been sent to the client (``reply.started`` is False)."""
        self.budget.deposit()
        max_attempts = self.settings.max_attempts
        # A cloud model occupies no runner here: nothing to count or learn for it.
        key = None if request.cloud else demand_key(request.model_key, request.route.name)
        tried: list[str] = []
        enqueued = time.monotonic()
        # 5xx answers wait to be counted against their backend: when a second backend answers
        # the same request with the same error, the request is at fault (Ollama answers some
        # bad requests with 500), and neither backend is blamed nor the request tried again.
        refused: list[tuple[BackendState, UpstreamStatusError]] = []
        last: UpstreamError | None = None
        try:
            while True:
                try:
                    # A retry keeps its place in the queue and jumps one class ahead.
                    slot = self.admission.slot(
                        request.model,
                        request.model_key,
                        request.route.name,
                        tried,
                        rank=request.rank + (1 if tried else 0),
                        enqueued=enqueued,
                        session=request.session,
                        num_ctx=request.num_ctx,
                        cloud=request.cloud,
                    )
                    async with slot as lease:
                        backend = lease.backend
                        tried.append(backend.id)
                        result.attempts = len(tried)
                        # Admission counted the request for its model there when it granted.
                        cold = key is not None and key not in backend.resident
                        dispatched = time.perf_counter()
                        try:
                            first_at = await self._attempt(
                                request, reply, result, backend, len(tried) < max_attempts
                            )
                        except UpstreamError as exc:
                            self._judge(backend, exc, result)
                            raise
                        lease.served_s = time.perf_counter() - dispatched
                except NoBackendError:
                    if last is not None:
                        raise last from None  # the backends that were tried failed
                    raise
                except UpstreamError as exc:
                    last = exc
                    if exc.address is not None:  # for the log only, never the client
                        log.info(
                            "attempt failed",
                            request_id=request.request_id,
                            backend=backend.id,
                            address=exc.address,
                            error=str(exc),
                        )
                    if isinstance(exc, UpstreamStatusError) and not exc.busy:
                        if self._alike(refused, backend, exc, request.request_id):
                            raise
                        refused.append((backend, exc))
                    if isinstance(exc, UpstreamTimeoutError):
                        raise  # the backend may still be generating: a retry doubles the work
                    if len(tried) >= max_attempts or not self.budget.withdraw():
                        raise
                    self.retries += 1
                    self.metrics.retries.labels(reason=exc.retry_reason).inc()
                    continue
                result.backend = backend.id
                self._judge(backend, None, result)
                served = lease.served_s or 0.0
                self._learn(backend, key, request, result, cold, first_at - dispatched, served)
                return
        finally:
            for backend, _ in refused:
                self.health.record_result(backend, False)

    async def _attempt(
        self,
        request: RoutedRequest,
        reply: Reply,
        result: Result,
        backend: BackendState,
        can_retry: bool,
    ) -> float:
        """One try on ``backend``; returns when its first byte came (perf_counter)."""
        url = backend.url + request.path
        try:
            resp = await self.upstream.open(request.method, url, request.headers, request.body)
        except UpstreamTimeoutError:
            # Sent but no answer in first_token_s: retrying would double GPU work.
            raise UpstreamTimeoutError(f"backend {backend.id} did not answer in time") from None
        except UpstreamMalformedError as exc:
            # It answered, with something that is no Ollama answer (not HTTP, a redirect).
            raise type(exc)(f"backend {backend.id}: {exc}", address=exc.address) from None
        except UpstreamError as exc:
            raise UpstreamConnectError(
                f"backend {backend.id} unreachable: {exc}", address=exc.address
            ) from None
        try:
            if resp.status >= 500 and can_retry:
                try:
                    payload = await asyncio.wait_for(resp.read_all(65536), 5)
                except (TimeoutError, UpstreamError):
                    payload = b""
                busy = resp.status == 503 and BUSY in payload
                ctype = (resp.header(b"content-type") or b"").decode("latin-1")
                raise UpstreamStatusError(resp.status, payload, ctype, busy, backend.id)
            return await reply.relay(
                resp, backend.id, result, request.started, self.upstream.timeouts.idle_s
            )
        finally:
            resp.close()

    def _judge(self, backend: BackendState, error: UpstreamError | None, result: Result) -> None:
        """What one attempt tells of the backend's health (the only place that says it)."""
        if isinstance(error, UpstreamStatusError):
            return  # counted once forward() knows whether the request was at fault
        if isinstance(error, UpstreamMalformedError):
            self.metrics.backend_malformed.labels(backend=backend.id, reason=error.reason).inc()
            self.health.record_result(backend, False, transport=True, answered=True)
        elif error is not None:
            transport = isinstance(error, UpstreamConnectError | UpstreamBrokenError)
            self.health.record_result(backend, False, transport=transport)
        elif result.error is not None:  # the answer broke off mid-stream
            self.health.record_result(backend, False, transport=True)
        elif not result.busy:  # Ollama's "server busy" says nothing of its health
            self.health.record_result(backend, result.status < 500)

    def _alike(
        self,
        refused: list[tuple[BackendState, UpstreamStatusError]],
        backend: BackendState,
        exc: UpstreamStatusError,
        request_id: str,
    ) -> bool:
        """Another backend refused the request the same way: the request is at fault. Those
        backends are forgiven (taken out of ``refused``)."""
        same = [b for b, e in refused if (e.status, str(e)) == (exc.status, str(exc))]
        if not same:
            return False
        refused[:] = [(b, e) for b, e in refused if b not in same]
        log.info(
            "backends refused the request alike; not counted against them",
            request_id=request_id,
            status=exc.status,
            error=str(exc),
            backends=[backend.id, *(b.id for b in same)],
        )
        return True

    def _learn(
        self,
        backend: BackendState,
        key: str | None,
        request: RoutedRequest,
        result: Result,
        cold: bool,
        first_s: float,
        served: float,
    ) -> None:
        """What the answer says of the backend: its speed (from dispatch, so time in corral's
        queue does not make it look slow), prompt tokens and cache hits (counted), its load
        speed after a cold load, its prefill speed, and the conversation's context size."""
        backend.last_response_time = served
        prev = backend.avg_response_time
        backend.avg_response_time = served if prev is None else prev * 0.9 + served * 0.1
        if result.status != 200 or result.error is not None:
            return
        backend.ttft.observe(first_s)
        stats = result.stats
        prompt = stats.get("prompt_eval_count", stats.get("prompt_tokens", 0))
        if request.conversation is not None:
            self.router.note_context(request.conversation, prompt + result.tokens, backend.id)
        if not stats:
            return
        cached = stats.get("prompt_eval_cached_count", stats.get("cached_tokens", 0))
        metrics = self.metrics
        if prompt:
            metrics.child(metrics.prompt_tokens, backend.id).inc(prompt)
            if cached:
                metrics.child(metrics.prompt_tokens_cached, backend.id).inc(min(cached, prompt))
        prefill_ns = stats.get("prompt_eval_duration", 0)
        if prefill_ns and prompt > cached:
            self.demand.observe_prefill(backend.id, prompt - cached, prefill_ns / 1e9)
        load_ns = stats.get("load_duration", 0)
        if cold and key is not None and load_ns > 250_000_000:
            size = self.router.model_size(key)
            if size:
                self.demand.observe_load(backend.id, size, load_ns / 1e9)


__all__ = ["Forwarder", "RoutingError"]
