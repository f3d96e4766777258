"""The strategy contract: a pure choice over frozen snapshots of backends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from corral.fleet.backends import Candidate


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a strategy may know about the request being placed."""

    model: str = ""
    route: str = ""


class Strategy(Protocol):
    """Picks one candidate. Never called with an empty sequence; does no I/O."""

    name: str

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate: ...
