"""The exception tree of corral.

CorralError
├── ConfigError                 invalid configuration (exit code 2)
├── UnknownStrategyError        a strategy name not in the registry
├── BackendError                admin operations on backends
│   ├── UnknownBackendError
│   └── DuplicateBackendError
├── PlacementError              a model load or unload a backend refused or failed
│   └── NotInstalledError       the model is not on the backend(s) named
├── ResolutionError             a [[discovery]] DNS lookup failed (corral.fleet.discovery)
├── ClusterUnavailableError     the [cluster] Redis did not answer in time: decide locally
│                               (corral.cluster.link; never reaches a client)
└── RoutingError                a request could not be served (mapped to HTTP at one boundary)
    ├── RequestError            the request itself is wrong (400, 413), told before any routing
    ├── ModelNotFoundError      no backend lists the model            -> 404
    ├── NoBackendError          nothing healthy / all full / ejected  -> 503 + Retry-After
    └── UpstreamError           a backend failed; raised by the upstream seam (corral.upstream),
        │                       which translates the HTTP client's own exceptions, and nowhere else
        ├── UpstreamConnectError    never connected, nothing sent: safe to try elsewhere  -> 502
        ├── UpstreamTimeoutError    sent, no answer in time: never retried (the GPU may be
        │                           working on it)                                         -> 504
        ├── UpstreamBrokenError     the connection broke or the answer was malformed       -> 502
        │   └── UpstreamMalformedError  an answer corral cannot use (``reason`` labels
        │       │                       ``corral_backend_malformed``): not HTTP       -> 502
        │       ├── UpstreamTooLargeError   a body over corral's cap
        │       ├── UpstreamRedirectError   a 3xx (an Ollama never redirects)
        │       └── UpstreamBadBodyError    a body that is not the JSON asked for
        └── UpstreamStatusError     the backend answered 5xx before the client saw a byte  -> 5xx

An ``UpstreamError`` carries ``retry_reason``, the label of ``corral_retries_total`` when the
request is tried on another backend. Its message goes to clients, so it never names the
backend's host or port: those are in ``address``, for logs. After the first byte reached the
client nothing is raised to the client any more: the relay ends the stream with an error line
(or cuts a plain body).
"""

from __future__ import annotations

import json


class CorralError(Exception):
    """Base of every error corral raises on purpose."""


class ConfigError(CorralError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UnknownStrategyError(CorralError, ValueError):
    """A strategy name that is not registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown strategy {name!r}; known: {', '.join(known)}")


class BackendError(CorralError):
    """An admin operation on a backend failed."""


class UnknownBackendError(BackendError, KeyError):
    def __init__(self, backend_id: str) -> None:
        self.backend_id = backend_id
        super().__init__(f"unknown backend {backend_id!r}")

    def __str__(self) -> str:
        return f"unknown backend {self.backend_id!r}"


class DuplicateBackendError(BackendError):
    def __init__(self, backend_id: str) -> None:
        self.backend_id = backend_id
        super().__init__(f"backend {backend_id!r} already exists")


class RoutingError(CorralError):
    """A request could not be served; carries the HTTP status it maps to."""

    status = 503


class ModelNotFoundError(RoutingError):
    status = 404

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"model '{model}' not found")


class NoBackendError(RoutingError):
    status = 503

    def __init__(self, message: str = "no backend available", retry_after_s: int = 1) -> None:
        self.retry_after_s = max(1, int(retry_after_s))
        super().__init__(message)


class RequestError(RoutingError):
    """The client's request is malformed or too large (400 unless told otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class UpstreamError(RoutingError):
    """A backend failed; ``retry_reason`` labels the retry it may cause.

    The message may reach a client: it names no host, port or URL. ``address`` (the backend's
    ``host:port`` or URL) is for logs only."""

    status = 502
    retry_reason = "error"
    address: str | None = None

    def __init__(self, *args: object, address: str | None = None) -> None:
        super().__init__(*args)
        if address is not None:
            self.address = address


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, connect timeout): nothing was sent."""

    retry_reason = "connect"


class UpstreamTimeoutError(UpstreamError):
    """The backend took the request but sent nothing within the limit."""

    status = 504
    retry_reason = "timeout"


class UpstreamBrokenError(UpstreamError):
    """The connection closed or reset, or the answer was not valid HTTP."""

    retry_reason = "connect"


class UpstreamMalformedError(UpstreamBrokenError):
    """The backend answered, but not with something corral can use: not HTTP (a bad status
    line, an oversized header), a body over corral's cap, a redirect. A failure before the
    first byte like a broken connection (retried elsewhere), but the backend is reachable, so a
    good probe does not lift the ejection it earns. ``reason`` labels
    ``corral_backend_malformed``."""

    reason = "malformed_http"
    retry_reason = "malformed"


class UpstreamTooLargeError(UpstreamMalformedError):
    """A body corral buffers was over its cap; the read stopped there."""

    reason = "too_large"


class UpstreamRedirectError(UpstreamMalformedError):
    """A 3xx: an Ollama never redirects, so the backend is misconfigured or hostile. The
    ``Location`` is never relayed."""

    reason = "redirect"


class UpstreamBadBodyError(UpstreamMalformedError):
    """A body that is not the JSON asked for (a listing, a version, a model list)."""

    reason = "bad_entry"


class UpstreamStatusError(UpstreamError):
    """The backend answered 5xx before any byte reached the client (its body kept, small)."""

    def __init__(
        self, status: int, payload: bytes, content_type: str, busy: bool, backend_id: str
    ) -> None:
        self.backend_id = backend_id
        self.status = status
        self.payload = payload
        self.content_type = content_type
        self.busy = busy  # Ollama's 503 "server busy": its own queue is full
        self.retry_reason = "busy" if busy else "status_5xx"
        super().__init__(error_text(payload) or f"backend answered {status}")


class PlacementError(CorralError):
    """A model load or unload that a backend refused or failed."""


class NotInstalledError(PlacementError):
    """The model is not installed on the backend(s) named."""


def error_text(payload: bytes) -> str:
    """The message of an Ollama or OpenAI error body (the raw text when it is no JSON)."""
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
