"""What the simulator saw: counters and the last requests, served at ``GET /_sim/stats``."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

RECENT_MAX = 200
GENERATING = frozenset(
    {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/chat/completions",
     "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"}
)  # fmt: skip


class RequestRecord:
    """One request as the simulator handled it (mutated in place until it ends)."""

    __slots__ = (
        "cancelled",
        "client",
        "ended",
        "error",
        "host",
        "model",
        "request_id",
        "route",
        "started",
        "status",
    )

    def __init__(self, route: str, host: str, request_id: str | None, client: str) -> None:
        self.route = route
        self.model: str | None = None
        self.status = 0
        self.cancelled = False
        self.host = host
        self.client = client
        self.request_id = request_id
        self.error: str | None = None
        self.started = time.time()
        self.ended: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as served in ``recent``."""
        return {
            "route": self.route,
            "model": self.model,
            "status": self.status,
            "cancelled": self.cancelled,
            "host": self.host,
            "client": self.client,
            "request_id": self.request_id,
            "error": self.error,
            "started": self.started,
            "ended": self.ended,
        }


class Stats:
    """Counters over every non-``/_sim`` request.

    ``failed`` counts requests that ended with a status >= 400 or with an error or drop after the
    stream started; ``cancelled`` counts requests whose client went away first.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        """Forget everything (in-flight requests still count down when they end)."""
        self.requests_total = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.by_route: dict[str, int] = {}
        self.recent: deque[RequestRecord] = deque(maxlen=RECENT_MAX)
        self._in_flight: set[RequestRecord] = set()
        # The most generation requests (the routes that take a runner slot) at once since
        # the last reset: what max_concurrent bounds.
        self.peak_in_flight = 0
        self._generating = 0

    def begin(self, route: str, host: str, request_id: str | None, client: str) -> RequestRecord:
        """Record the start of a request."""
        rec = RequestRecord(route, host, request_id, client)
        self.requests_total += 1
        self.by_route[route] = self.by_route.get(route, 0) + 1
        self.recent.append(rec)
        self._in_flight.add(rec)
        if route in GENERATING:
            self._generating += 1
            self.peak_in_flight = max(self.peak_in_flight, self._generating)
        return rec

    def end(self, rec: RequestRecord) -> None:
        """Record the end of a request (its status/cancelled/error fields are final)."""
        rec.ended = time.time()
        if rec not in self._in_flight:
            return  # started before a reset
        self._in_flight.discard(rec)
        if rec.route in GENERATING:
            self._generating -= 1
        if rec.cancelled:
            self.cancelled += 1
        elif rec.status >= 400 or rec.error is not None:
            self.failed += 1
        else:
            self.completed += 1

    def to_json(self) -> dict[str, Any]:
        """The ``GET /_sim/stats`` document."""
        return {
            "name": self.name,
            "requests_total": self.requests_total,
            "in_flight": len(self._in_flight),
            "peak_in_flight": self.peak_in_flight,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "by_route": dict(self.by_route),
            "recent": [r.to_json() for r in self.recent],
        }
