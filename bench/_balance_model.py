"""The yardstick for the queued configurations: a zero-overhead central FIFO queue, computed.

Every request, in arrival order, takes the slot that frees first (ties: the faster slot),
exactly what corral's late binding approximates, minus every cost of the real thing (HTTP,
the hand-off from a freed slot to the next waiter, the event loops). Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Served:
    latency_s: float
    slot: int


def central_fifo(
    arrivals: Sequence[float], slots: Sequence[float], *, handoff_s: float = 0.0
) -> list[Served]:
    """Serve ``arrivals`` (sorted, seconds) on ``slots`` (each slot's service time, seconds).

    ``handoff_s`` idles a slot that much before a request that had to wait for it (the
    dispatch gap of a real queue); a request that finds the slot free starts at once.
    """
    if not slots or any(s <= 0 for s in slots):
        raise ValueError("need at least one slot, every service time positive")
    free_at = [0.0] * len(slots)
    out: list[Served] = []
    for t in arrivals:
        i = min(range(len(slots)), key=lambda k: (max(free_at[k], t), slots[k], k))
        start = max(free_at[i], t)
        if free_at[i] > t:
            start += handoff_s
        free_at[i] = start + slots[i]
        out.append(Served(free_at[i] - t, i))
    return out
