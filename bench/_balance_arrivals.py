"""Bursty open-loop arrival schedules for bench/balance.py. Pure functions, no I/O.

The process is an on/off modulated Poisson process: the window is cut into alternating "on"
and "off" periods of exponential length; the arrival intensity during "on" is ``burst`` times
the intensity during "off". Exactly ``round(rate * duration_s)`` arrivals are drawn, each
independently from that piecewise-constant density (a Poisson process conditioned on its
count), so every run offers exactly the mean rate asked for and only the timing is random.
The same ``seed`` gives the same schedule, so every configuration sees the same arrivals.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    on: bool

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Schedule:
    """Arrival times (seconds from the start, sorted) and the on/off pattern behind them."""

    times: list[float]
    segments: list[Segment]
    duration_s: float
    burst: float

    @property
    def count(self) -> int:
        return len(self.times)

    @property
    def mean_rate(self) -> float:
        return self.count / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def on_fraction(self) -> float:
        on = sum(s.length_s for s in self.segments if s.on)
        return on / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def peak_rate(self) -> float:
        """The intensity during "on" periods (arrivals per second)."""
        weight = sum(s.length_s * (self.burst if s.on else 1.0) for s in self.segments)
        return self.count * self.burst / weight if weight > 0 else 0.0

    def max_in(self, window_s: float) -> int:
        """The most arrivals inside any window of ``window_s`` seconds (burstiness check)."""
        best = 0
        lo = 0
        for hi, t in enumerate(self.times):
            while t - self.times[lo] > window_s:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


def on_off_segments(
    duration_s: float,
    mean_on_s: float,
    mean_off_s: float,
    rng: random.Random,
    *,
    quiet_tail_s: float = 0.0,
) -> list[Segment]:
    """Alternating periods covering [0, duration_s], starting "off"; exponential lengths.

    The last ``quiet_tail_s`` seconds are forced "off", so the window does not end in the
    middle of a burst (whose backlog would then dominate the drain time of every run).
    """
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s!r}")
    if not (mean_on_s > 0 and mean_off_s > 0):
        raise ValueError("mean on and off periods must be positive")
    end_on = max(0.0, duration_s - max(0.0, quiet_tail_s))
    segments: list[Segment] = []
    t = 0.0
    on = False
    while t < duration_s:
        end = min(duration_s, t + rng.expovariate(1.0 / (mean_on_s if on else mean_off_s)))
        if on and end > end_on:
            # Clip the burst at the quiet tail; what is left of it is "off".
            if end_on > t:
                segments.append(Segment(t, end_on, True))
            segments.append(Segment(max(t, end_on), end, False))
        elif end > t:
            segments.append(Segment(t, end, on))
        t = end
        on = not on
    # Merge neighbours in the same state (the forced tail may follow an "off" period).
    merged: list[Segment] = []
    for seg in segments:
        if merged and merged[-1].on == seg.on:
            merged[-1] = Segment(merged[-1].start_s, seg.end_s, seg.on)
        else:
            merged.append(seg)
    return merged


def bursty_schedule(
    rate: float,
    duration_s: float,
    *,
    seed: int,
    burst: float = 4.0,
    mean_on_s: float = 2.0,
    mean_off_s: float = 3.0,
    quiet_tail_s: float = 2.0,
) -> Schedule:
    """``round(rate * duration_s)`` arrivals in [0, duration_s), bursty, reproducible.

    ``burst`` is the ratio of the "on" intensity to the "off" intensity (1: plain Poisson).
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    if burst < 1:
        raise ValueError(f"burst must be ≥ 1, got {burst!r}")
    rng = random.Random(seed)
    segments = on_off_segments(duration_s, mean_on_s, mean_off_s, rng, quiet_tail_s=quiet_tail_s)
    weights = [s.length_s * (burst if s.on else 1.0) for s in segments]
    cumulative: list[float] = []
    total = 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    count = round(rate * duration_s)
    times: list[float] = []
    for _ in range(count):
        u = rng.random() * total
        i = min(bisect.bisect_right(cumulative, u), len(segments) - 1)
        seg = segments[i]
        before = cumulative[i] - weights[i]
        frac = (u - before) / weights[i] if weights[i] > 0 else 0.0
        times.append(min(seg.start_s + frac * seg.length_s, duration_s))
    times.sort()
    return Schedule(times, segments, duration_s, burst)
