"""Rotation strategies: ``round_robin``, ``weighted_round_robin`` and ``equal_weighted``."""

from __future__ import annotations

import random
from collections.abc import Sequence

from corral.fleet.backends import Candidate
from corral.strategies._common import RandomizedStrategy, next_after
from corral.strategies.base import RequestInfo

_GB = 10**9

# (minimum total VRAM in bytes, weight), largest first.
_VRAM_WEIGHTS: tuple[tuple[int, float], ...] = (
    (80 * _GB, 3.0),
    (40 * _GB, 2.0),
    (24 * _GB, 1.5),
)


def weight_for_vram(total_bytes: int | None) -> float:
    """The default ``weighted_round_robin`` weight of a backend with this much GPU memory.

    80 GB+ → 3.0, 40 GB+ → 2.0, 24 GB+ → 1.5, else (or unknown, ``None``) → 1.0.

    GB here is decimal (10**9 bytes), on purpose: cards are sold as "N GB" but NVML reports
    their total in bytes that sometimes fall a little short of N GiB (an L4 "24 GB" reports
    23,034 MiB ≈ 24.15e9 bytes, an A6000 "48 GB" 49,140 MiB). Against decimal thresholds every
    such card lands in the tier its label promises, and a 24 GiB card (25.7e9) counts as 24 GB+.
    """
    if total_bytes is None:
        return 1.0
    for threshold, weight in _VRAM_WEIGHTS:
        if total_bytes >= threshold:
            return weight
    return 1.0


class RoundRobin(RandomizedStrategy):
    """Next candidate in circular order of ids after the one chosen last."""

    name = "round_robin"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        super().__init__(rng=rng)
        self._last_id: str | None = None

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        chosen = next_after(candidates, self._last_id)
        self._last_id = chosen.id
        return chosen


class WeightedRoundRobin(RandomizedStrategy):
    """Smooth weighted round robin (nginx): spreads picks evenly in proportion to weight.

    Each pick adds every candidate's weight to its running ``current``, chooses the highest
    ``current`` (ties: smaller id) and subtracts the total weight from the chosen one. Weights
    3:1 give a b a a, a b a a, … — exactly 3:1 over every 4 picks, never 3 in a row
    needlessly. State is keyed by id; ids no longer among the candidates are dropped, and a
    newcomer starts at 0. Non-positive weights count as 0 (never chosen while a weighted
    candidate is eligible); when every weight is 0 they all count as 1.
    """

    name = "weighted_round_robin"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        super().__init__(rng=rng)
        self._current: dict[str, float] = {}

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        weights = [c.weight if c.weight > 0 else 0.0 for c in candidates]  # NaN -> 0 too
        total = sum(weights)
        if total <= 0:
            weights = [1.0] * len(candidates)
            total = float(len(candidates))
        previous = self._current
        current: dict[str, float] = {}
        best: Candidate = candidates[0]
        best_value = 0.0
        for index, (candidate, weight) in enumerate(zip(candidates, weights, strict=True)):
            value = previous.get(candidate.id, 0.0) + weight
            current[candidate.id] = value
            if index == 0 or value > best_value or (value == best_value and candidate.id < best.id):
                best, best_value = candidate, value
        current[best.id] = best_value - total
        self._current = current
        return best


class EqualWeighted(RandomizedStrategy):
    """Fewest lifetime ``total_requests``; ties rotate by id, as in ``round_robin``.

    Rotating (rather than drawing at random) among equal totals keeps a burst fair even
    when the totals in the snapshots lag behind the picks.
    """

    name = "equal_weighted"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        super().__init__(rng=rng)
        self._last_id: str | None = None

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        fewest = min(c.total_requests for c in candidates)
        tied = [c for c in candidates if c.total_requests == fewest]
        chosen = tied[0] if len(tied) == 1 else next_after(tied, self._last_id)
        self._last_id = chosen.id
        return chosen
