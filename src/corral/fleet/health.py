"""Health: active probes (fall/rise, backoff while down) and passive ejection on errors."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import structlog

from corral.config import HealthSettings
from corral.errors import UpstreamError, UpstreamMalformedError
from corral.fleet import inventory
from corral.fleet.backends import BackendRegistry, BackendState, Clock
from corral.metrics import Metrics
from corral.upstream import Upstream

log = structlog.get_logger("corral.health")


class HealthChecker:
    """Probes every backend with ``GET /api/version`` and refreshes its model lists."""

    def __init__(
        self,
        registry: BackendRegistry,
        upstream: Upstream,
        settings: HealthSettings,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
        hidden: Callable[[str], set[str]] | None = None,
    ) -> None:
        self.registry = registry
        # Models a backend still lists but must not serve (the fleet deleted them while it
        # was away: corral.fleet.replays).
        self._hidden = hidden
        self.upstream = upstream
        self.settings = settings
        self.metrics = metrics
        self._clock = clock
        self._next_probe: dict[str, float] = {}
        self.unusable = inventory.Unusable(metrics, log, "backend answer unusable")

    async def run(self) -> None:
        """Probe forever; each round catches and logs its own errors."""
        while True:
            try:
                await self.probe_due()
                self.registry.expire()
            except Exception:
                log.exception("health round failed")
            await asyncio.sleep(self._tick())

    def _tick(self) -> float:
        # Look for due probes often enough for short intervals, at most twice a second.
        return min(self.settings.interval_s, 1.0) / 2

    async def probe_due(self) -> None:
        now = self._clock()
        due = [b for b in self.registry.all() if self._next_probe.get(b.id, 0.0) <= now]
        if due:
            await asyncio.gather(*(self.probe(b) for b in due))

    async def probe_all(self) -> None:
        """Probe every backend now (start-up, tests)."""
        await asyncio.gather(*(self.probe(b) for b in self.registry.all()))

    async def probe(self, backend: BackendState) -> bool:
        """One active check; updates state, model lists and the next probe time."""
        timeout = self.settings.timeout_s
        started = self._clock()
        ok = False
        try:
            answer = await self.upstream.get_json(f"{backend.url}/api/version", timeout)
            # Alive is "answers /api/version"; an odd version is left unknown, and counted.
            backend.version = inventory.version_of(answer)
            if backend.version is None:
                self.malformed(backend.id, "bad_entry", "/api/version: no usable version")
            tags, ps = await asyncio.gather(
                self.upstream.get_json(f"{backend.url}/api/tags", timeout),
                self.upstream.get_json(f"{backend.url}/api/ps", timeout),
            )
            if skipped := inventory.update(backend, tags, ps):
                self.malformed(backend.id, "bad_entry", "model list entries skipped", skipped)
            if self._hidden is not None and (hidden := self._hidden(backend.id)):
                backend.models -= hidden
            self.registry.refresh_models()
            ok = True
        except asyncio.CancelledError:
            raise
        except UpstreamError as exc:
            if isinstance(exc, UpstreamMalformedError):
                self.malformed(backend.id, exc.reason, str(exc))
            if backend.healthy or not backend.probed:
                log.debug("probe failed", backend=backend.id, address=exc.address, error=str(exc))
        except Exception as exc:
            if backend.healthy or not backend.probed:
                log.debug("probe failed", backend=backend.id, error=repr(exc))
        self.record_probe(backend, ok, started)
        return ok

    def malformed(self, backend_id: str, reason: str, detail: str, count: int = 1) -> None:
        """Count and log an answer (or ``count`` entries of one) corral could not use."""
        self.unusable.note(backend_id, reason, detail, count)

    def record_probe(self, backend: BackendState, ok: bool, started: float | None = None) -> None:
        s = self.settings
        backend.probe_history.append(ok)
        first = not backend.probed
        backend.probed = True
        if ok:
            backend.consecutive_probe_failures = 0
            backend.consecutive_probe_successes += 1
            if not backend.healthy and (first or backend.consecutive_probe_successes >= s.rise):
                self._transition(backend, True)
            elif (
                backend.healthy
                and backend.ejected_for_transport
                and backend.is_ejected(self._clock())
                and (started is None or started >= backend.ejected_at)
            ):
                # It was ejected for being unreachable and answers again (restarted, say).
                backend.ejected_until = 0.0
                backend.ejected_for_transport = False
                log.info("backend reachable again; ejection lifted", backend=backend.id)
                self.metrics.backend_up.labels(backend=backend.id).set(1)
                self.registry.notify()
            elif backend.healthy:
                self.metrics.backend_up.labels(backend=backend.id).set(
                    0 if backend.is_ejected(self._clock()) else 1
                )
            self._next_probe[backend.id] = self._clock() + self._jitter(s.interval_s)
        else:
            backend.consecutive_probe_successes = 0
            backend.consecutive_probe_failures += 1
            if backend.healthy and backend.consecutive_probe_failures >= s.fall:
                self._transition(backend, False)
            elif first:
                self._transition(backend, False, force=True)
            delay = s.interval_s
            if not backend.healthy:
                # Back off while down, but keep probing often enough to notice a return.
                extra = max(0, backend.consecutive_probe_failures - s.fall)
                delay = min(s.interval_s * (2 ** min(extra, 6)), max(s.backoff_max_s, s.interval_s))
            self._next_probe[backend.id] = self._clock() + self._jitter(delay)

    def _jitter(self, delay: float) -> float:
        return delay * random.uniform(0.9, 1.1)

    def _transition(self, backend: BackendState, up: bool, *, force: bool = False) -> None:
        if backend.healthy == up and not force:
            return
        backend.healthy = up
        if up:
            # Back from down (restarted, say): the errors that ejected it are history.
            backend.ejected_until = 0.0
            backend.consecutive_errors = 0
        to = "up" if up else "down"
        self.metrics.transitions.labels(backend=backend.id, to=to).inc()
        self.metrics.backend_up.labels(backend=backend.id).set(1 if up else 0)
        log.info("backend " + to, backend=backend.id, url=backend.url)
        self.registry.notify()

    # Passive health -----------------------------------------------------------------------

    def record_result(
        self, backend: BackendState, ok: bool, *, transport: bool = False, answered: bool = False
    ) -> None:
        """Record a proxied request's outcome. Ollama's 503 busy is load: do not call for it.

        ``transport``: the failure was the connection's or the answer's (counted towards
        ``consecutive_errors``); ``answered``: the backend did answer, malformed, so a good
        probe does not prove it well again (the ejection it earns is not lifted by one)."""
        now = self._clock()
        backend.add_outcome(now, ok)
        if ok:
            backend.consecutive_errors = 0
            if backend.ejections and not backend.is_ejected(now):
                # Healthy traffic after an ejection slowly forgives it.
                backend.ejections = max(0, backend.ejections - 1)
            return
        backend.total_failures += 1
        if transport:
            backend.consecutive_errors += 1
        s = self.settings
        total, bad = backend.error_stats(now, s.error_window_s)
        too_many = transport and backend.consecutive_errors >= s.consecutive_errors
        rate_high = total >= s.error_min_requests and bad / total > s.error_rate_threshold
        if (too_many or rate_high) and not backend.is_ejected(now):
            self.eject(backend, "consecutive transport errors" if too_many else "error rate")
            backend.ejected_for_transport = too_many and not answered

    def eject(self, backend: BackendState, reason: str) -> None:
        now = self._clock()
        backend.ejections += 1
        duration = min(self.settings.ejection_s * backend.ejections, self.settings.max_ejection_s)
        backend.ejected_until = now + duration
        backend.ejected_at = now
        backend.consecutive_errors = 0
        backend.clear_outcomes()
        self.metrics.transitions.labels(backend=backend.id, to="ejected").inc()
        self.metrics.backend_up.labels(backend=backend.id).set(0)
        log.warning("backend ejected", backend=backend.id, reason=reason, for_s=round(duration, 1))
        self.registry.notify()
