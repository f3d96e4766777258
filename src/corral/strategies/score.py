"""The ``score`` strategy: a weighted blend of availability, success rate and speed."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from corral.strategies._common import RandomizedStrategy, lowest
from corral.strategies.base import Candidate, RequestInfo

DEFAULT_SCORE_WEIGHTS: tuple[float, float, float] = (0.5, 0.3, 0.2)


def _unit(value: float) -> float:
    """Clamp to 0..1 (NaN -> 0)."""
    return min(1.0, value) if value > 0 else 0.0


class Score(RandomizedStrategy):
    """Highest score; ties broken at random with the injected rng.

    For each candidate::

        speed = fastest_ewma / own_ewma               (0..1; untried → 1.0)
        load  = in_flight / max(max_concurrent, 1)    (max_concurrent ≤ 0 counts as 1)
        score = (availability * w_a + success_rate * w_s + speed * w_sp) / (1 + load)

    ``fastest_ewma`` is the lowest positive ``ewma_ttft_s`` among the candidates.
    ``availability`` and ``success_rate`` are clamped to 0..1. Dividing by ``1 + load`` keeps
    the best backend from taking everything: half-full, it scores 2/3 of its idle score.
    Default weights (w_a, w_s, w_sp) are 0.5 / 0.3 / 0.2.
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
        for c in candidates:
            e = c.ewma_ttft_s
            if e is not None and e > 0 and (fastest is None or e < fastest):
                fastest = e
        w_a, w_s, w_sp = self.weights

        def negated_score(c: Candidate) -> float:
            e = c.ewma_ttft_s
            speed = 1.0 if e is None or e <= 0 or fastest is None else fastest / e
            slots = c.max_concurrent if c.max_concurrent > 0 else 1
            blended = _unit(c.availability) * w_a + _unit(c.success_rate) * w_s + speed * w_sp
            return -blended / (1.0 + c.in_flight / slots)

        return lowest(candidates, negated_score, self._rng)
