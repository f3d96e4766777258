"""The strategy contract: a pure choice over frozen snapshots of backends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class Candidate(NamedTuple):
    """What a strategy may know about one eligible backend, frozen at decision time.

    A NamedTuple, not a frozen dataclass: one is built per eligible backend on every pick,
    and a tuple is several times cheaper to build.
    """

    id: str
    weight: float = 1.0
    in_flight: int = 0
    max_concurrent: int = 4
    total_requests: int = 0
    # Peak-EWMA of time to first token in seconds; None while the backend is untried.
    ewma_ttft_s: float | None = None
    # 0..1 over the recent window; 1.0 when nothing is known yet.
    success_rate: float = 1.0
    # 0..1: fraction of recent health probes that succeeded.
    availability: float = 1.0


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a strategy may know about the request being placed."""

    model: str = ""
    route: str = ""


class Strategy(Protocol):
    """Picks one candidate. Never called with an empty sequence; does no I/O."""

    name: str

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate: ...
