"""The ``score`` strategy: a weighted blend of availability, success rate and speed."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from corral.fleet.backends import Candidate
from corral.strategies._common import RandomizedStrategy, lowest
from corral.strategies.base import RequestInfo

DEFAULT_SCORE_WEIGHTS: tuple[float, float, float] = (0.5, 0.3, 0.2)


def _unit(value: float) -> float:
    """Clamp to 0..1 (NaN -> 0)."""
    return min(1.0, value) if value > 0 else 0.0


class Score(RandomizedStrategy):
    """Highest score; ties broken at random with the injected rng.

    Each term is normalised over the eligible candidates (the best one scores 1.0)::

        free         = max(max_concurrent - in_flight, 0)      (max_concurrent ≤ 0 counts as 1)
        availability = free / most_free                         (all full → 0)
        success      = success_rate / best_success_rate         (all 0 → 0)
        speed        = fastest_ewma / own_ewma                  (untried → 1.0)
        score        = availability * w_a + success * w_s + speed * w_sp

    ``fastest_ewma`` is the lowest positive ``ewma_ttft_s`` among the candidates. Default
    weights (w_a, w_s, w_sp) are 0.5 / 0.3 / 0.2, so free slots weigh most: a fast backend
    keeps winning only while it has room.
    """

    name = "score"

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        weights: tuple[float, float, float] = DEFAULT_SCORE_WEIGHTS,
    ) -> None:
        super().__init__(rng=rng)
        if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"score weights must be three finite numbers ≥ 0, got {weights!r}")
        if sum(weights) <= 0:
            raise ValueError(f"score weights must not all be 0, got {weights!r}")
        self.weights = weights

    def __repr__(self) -> str:
        return f"Score(weights={self.weights!r})"

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        fastest: float | None = None
        most_free = 0
        best_success = 0.0
        for c in candidates:
            e = c.ewma_ttft_s
            if e is not None and e > 0 and (fastest is None or e < fastest):
                fastest = e
            most_free = max(most_free, _free(c))
            best_success = max(best_success, _unit(c.success_rate))
        w_a, w_s, w_sp = self.weights

        def negated_score(c: Candidate) -> float:
            e = c.ewma_ttft_s
            speed = 1.0 if e is None or e <= 0 or fastest is None else fastest / e
            availability = _free(c) / most_free if most_free else 0.0
            success = _unit(c.success_rate) / best_success if best_success else 0.0
            return -(availability * w_a + success * w_s + speed * w_sp)

        return lowest(candidates, negated_score, self._rng)


def _free(c: Candidate) -> int:
    slots = c.max_concurrent if c.max_concurrent > 0 else 1
    return max(slots - c.in_flight, 0)
