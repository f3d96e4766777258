"""The exception tree of corral.

CorralError
├── ConfigError                 invalid configuration (exit code 2)
├── UnknownStrategyError        a strategy name not in the registry
├── BackendError                admin operations on backends
│   ├── UnknownBackendError
│   └── DuplicateBackendError
└── RoutingError                a request could not be placed (mapped to HTTP at one boundary)
    ├── ModelNotFoundError      no backend lists the model            -> 404
    ├── NoBackendError          nothing healthy / all full / ejected  -> 503 + Retry-After
    └── UpstreamError           the chosen backends all failed        -> 502/504
"""

from __future__ import annotations


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


class UpstreamError(RoutingError):
    status = 502

    def __init__(self, message: str, status: int = 502) -> None:
        self.status = status
        super().__init__(message)
