"""Backend-choosing strategies, by name.

``STRATEGIES`` maps each name to its class; ``create_strategy(name)`` builds one and raises
``UnknownStrategyError`` (listing the known names) for anything else.
"""

from __future__ import annotations

import random

from corral.errors import UnknownStrategyError
from corral.fleet.backends import Candidate
from corral.fleet.ewma import PeakEwma
from corral.strategies._common import RandomizedStrategy
from corral.strategies.base import RequestInfo, Strategy
from corral.strategies.load import LeastConnections, LeastResponseTime
from corral.strategies.rotation import (
    EqualWeighted,
    RoundRobin,
    WeightedRoundRobin,
    weight_for_vram,
)
from corral.strategies.score import DEFAULT_SCORE_WEIGHTS, Score

__all__ = [
    "DEFAULT_SCORE_WEIGHTS",
    "STRATEGIES",
    "Candidate",
    "EqualWeighted",
    "LeastConnections",
    "LeastResponseTime",
    "PeakEwma",
    "RequestInfo",
    "RoundRobin",
    "Score",
    "Strategy",
    "WeightedRoundRobin",
    "create_strategy",
    "strategy_names",
    "weight_for_vram",
]

STRATEGIES: dict[str, type[RandomizedStrategy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        WeightedRoundRobin,
        EqualWeighted,
        LeastConnections,
        LeastResponseTime,
        Score,
    )
}


def strategy_names() -> list[str]:
    """The registered strategy names, sorted."""
    return sorted(STRATEGIES)


def create_strategy(
    name: str,
    *,
    rng: random.Random | None = None,
    score_weights: tuple[float, float, float] | None = None,
) -> Strategy:
    """A fresh strategy registered under ``name``.

    ``rng`` breaks ties (seed it for reproducible choices). ``score_weights`` —
    (availability, success rate, speed) — applies to ``score`` only and is ignored by the
    others, so a caller can pass its configured weights whatever the strategy.
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        raise UnknownStrategyError(name, strategy_names())
    if cls is Score and score_weights is not None:
        return Score(rng=rng, weights=score_weights)
    return cls(rng=rng)
