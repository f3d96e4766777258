"""Load-aware strategies: ``least_connections`` and ``least_response_time``."""

from __future__ import annotations

from collections.abc import Sequence

from corral.fleet.backends import Candidate
from corral.strategies._common import RandomizedStrategy, lowest
from corral.strategies.base import RequestInfo


def _utilisation(candidate: Candidate) -> float:
    """In-flight requests per slot; ``max_concurrent`` ≤ 0 counts as 1 slot."""
    slots = candidate.max_concurrent if candidate.max_concurrent > 0 else 1
    return candidate.in_flight / slots


def _response_time_key(candidate: Candidate) -> tuple[int, float]:
    # Untried backends sort first (fewest in flight among them), then by expected wait.
    if candidate.ewma_ttft_s is None:
        return (0, float(candidate.in_flight))
    return (1, candidate.ewma_ttft_s * (candidate.in_flight + 1))


class LeastConnections(RandomizedStrategy):
    """Lowest ``in_flight / max_concurrent``; ties broken at random with the injected rng.

    Relative to ``max_concurrent`` so that a big backend with 3 of 8 slots busy is preferred
    over a small one with 2 of 2 busy (long streams hold slots for their whole duration).
    """

    name = "least_connections"

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        return lowest(candidates, _utilisation, self._rng)


class LeastResponseTime(RandomizedStrategy):
    """Lowest ``ewma_ttft_s * (in_flight + 1)``: the expected wait for a first token.

    Candidates never tried (``ewma_ttft_s is None``) come first, so every backend gets
    measured; among them the fewest in flight wins. Remaining ties: the injected rng.
    """

    name = "least_response_time"

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        return lowest(candidates, _response_time_key, self._rng)
