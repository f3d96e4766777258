"""Statistics for the benchmark: percentiles, latency summaries, rates, medians of rounds.

Pure functions, no I/O, so tests/bench/test_bench_smoke.py can check them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks
    (numpy's default). ``values`` need not be sorted; NaN when empty."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize_latencies(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / mean of a list of latencies in seconds, reported in milliseconds."""
    if not latencies_s:
        return {"count": 0, "p50_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan}
    data = sorted(latencies_s)
    return {
        "count": len(data),
        "p50_ms": percentile(data, 50) * 1000,
        "p99_ms": percentile(data, 99) * 1000,
        "mean_ms": statistics.fmean(data) * 1000,
    }


def rate(count: int, duration_s: float) -> float:
    """Events per second; 0 for an empty window."""
    return count / duration_s if duration_s > 0 else 0.0


def median_of(values: Iterable[float]) -> float:
    """Median of the finite values (rounds that measured something); NaN if none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan
