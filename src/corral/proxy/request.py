"""What travels down the hot path and what comes back: one request object, one result."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.auth import ClientKey
from corral.shapes import Shape
from corral.upstream import Headers


@dataclass(frozen=True, slots=True)
class Route:
    """A routed endpoint: its metric label and the shape of its errors."""

    name: str
    shape: Shape = "ollama"  # whose API: the shape of its errors and of its stream's error line
    events: bool = False  # its SSE stream names its events (Responses, Messages)
    # Ollama answers a missing model with 400 "model is required" here (404 elsewhere).
    model_required: bool = False


@dataclass(slots=True)
class RoutedRequest:
    """One routed request, as the front door read it: everything later stops need."""

    route: Route
    method: str
    path: str  # with the query string, as sent upstream
    body: bytes | None
    model: str
    model_key: str  # Ollama's matching key (``normalize_model``)
    request_id: str
    headers: Headers  # forwarded upstream (hop-by-hop and keys removed, X-Request-ID set)
    started: float  # perf_counter at the door
    stream: bool = True
    rank: int = 1  # priority class
    session: str | None = None  # the conversation it continues (session affinity)
    conversation: str | None = None  # the conversation it belongs to, remembered once served
    num_ctx: int | None = None
    client: ClientKey | None = None
    cloud: bool = False  # runs on Ollama's cloud through a backend (no GPU of corral's)
    # The client's address: the TCP peer, or the one a trusted proxy names (corral.guard).
    remote_addr: str | None = None


@dataclass(slots=True)
class Result:
    """How a routed request ended: what metrics, logs and health read, each in one place."""

    status: int = 499
    backend: str | None = None
    attempts: int = 0
    ttft_s: float | None = None
    tokens: int = 0
    error: str | None = None
    busy: bool = False  # the backend answered Ollama's 503 "server busy" (its queue is full)
    # The backend's final counters (prompt tokens, cache hits, load and prefill times).
    stats: dict[str, int] = field(default_factory=dict)


# Request headers that are not forwarded: they belong to one connection (RFC 9110 §7.6.1),
# corral sets them itself, or they carry corral's own keys.
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
        b"authorization",
    }
)


def forwarded_headers(received: Headers, rid: str) -> Headers:
    """The request headers a backend gets: without :data:`HOP_BY_HOP` and the headers the
    client's ``Connection`` names (they belong to its connection, RFC 9110 §7.6.1), with
    ``X-Request-ID`` set."""
    headers: Headers = []
    named: list[bytes] | None = None
    for k, v in received:
        if k in HOP_BY_HOP:
            if k == b"connection":
                named = (named or []) + [t.strip().lower() for t in v.split(b",")]
            continue
        headers.append((k, v))
    if named:
        drop = set(named) - {b"keep-alive", b"close", b""}
        if drop:
            headers = [(k, v) for k, v in headers if k not in drop]
    headers.append((b"x-request-id", rid.encode()))
    return headers
