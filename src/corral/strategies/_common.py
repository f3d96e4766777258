"""Helpers shared by the strategy families: the rng-holding base and cheap O(n) pickers."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from corral.fleet.backends import Candidate
from corral.strategies.base import RequestInfo


class RandomizedStrategy:
    """Base of the built-in strategies: holds the injected rng used to break ties.

    Every built-in strategy accepts ``rng`` (keyword-only) so that ``create_strategy`` can
    build any of them the same way and tests can seed them.
    """

    name: str = ""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def select(self, candidates: Sequence[Candidate], request: RequestInfo) -> Candidate:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def lowest(
    candidates: Sequence[Candidate],
    key: Callable[[Candidate], Any],
    rng: random.Random,
) -> Candidate:
    """The candidate with the lowest ``key``; ties broken uniformly with ``rng``.

    One pass, no sorting. The rng is consulted only when there is a tie, so a strategy
    without ties is fully deterministic.
    """
    best_key: Any = None
    ties: list[Candidate] = []
    for candidate in candidates:
        k = key(candidate)
        if not ties or k < best_key:
            best_key = k
            ties = [candidate]
        elif k == best_key:
            ties.append(candidate)
    return ties[0] if len(ties) == 1 else rng.choice(ties)


def next_after(candidates: Sequence[Candidate], last_id: str | None) -> Candidate:
    """The candidate whose id follows ``last_id`` in sorted id order, wrapping around.

    One pass, no sorting: track the smallest id overall and the smallest id above
    ``last_id``. Keyed by id, so the rotation stays fair when the candidate set changes
    between calls (an id that left is simply skipped, a new id takes its sorted place).
    """
    first: Candidate | None = None
    following: Candidate | None = None
    for candidate in candidates:
        cid = candidate.id
        if first is None or cid < first.id:
            first = candidate
        if last_id is not None and cid > last_id and (following is None or cid < following.id):
            following = candidate
    chosen = following if following is not None else first
    assert chosen is not None, "strategies are never called with no candidates"
    return chosen
