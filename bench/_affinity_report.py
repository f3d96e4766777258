"""bench/affinity.py's numbers: one configuration's summary, the verdicts against the issue's
goals, and the table in markdown. Pure functions, no I/O."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from _affinity_workload import Change, count_changes
from _balance_report import _num
from _report import fmt, mark
from _stats import percentile, rate, summarize_latencies

# Goals from the issue: affinity on against round robin.
MIN_COLD_LOAD_RATIO = 5.0
BASELINE = "round_robin"
CHALLENGER = "affinity_on"

# Configuration name -> (strategy, model_affinity, label); in the order they run and print.
CONFIGS: dict[str, tuple[str, bool, str]] = {
    "round_robin": ("round_robin", False, "round robin, GPU-blind"),
    "affinity_off": ("least_connections", False, "affinity off"),
    "affinity_on": ("least_connections", True, "affinity on"),
}


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it; times in seconds from the start of the run."""

    client: int
    model: str
    stream: bool
    sent_s: float
    done_s: float
    status: int  # 0: no HTTP answer
    backend: str | None = None
    load_wait_s: float = 0.0  # the simulator's load_duration: waiting for its model to load
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s


def summarize(
    outcomes: Sequence[Outcome], changes: Sequence[Change], *, wall_s: float, load_s: float
) -> dict[str, Any]:
    """One configuration's numbers. Latency runs from sending to the last byte; req/s is
    completed requests over the run's wall time (window and drain); a request "waited for a
    load" when its load_duration was at least half the simulators' load time."""
    ok = [o for o in outcomes if o.ok]
    latencies = [o.latency_s for o in ok]
    lat = summarize_latencies(latencies)
    errors: Counter[str] = Counter(o.error or f"status {o.status}" for o in outcomes if not o.ok)
    by_model: dict[str, Counter[str]] = {}
    for o in ok:
        by_model.setdefault(o.model, Counter())[o.backend or "?"] += 1
    return {
        "requests": len(ok),
        "errors": errors.total(),
        "error_kinds": dict(errors.most_common(5)),
        "wall_s": wall_s,
        "throughput_rps": rate(len(ok), wall_s),
        "p50_ms": lat["p50_ms"],
        "p95_ms": percentile(latencies, 95) * 1000,
        "p99_ms": lat["p99_ms"],
        "mean_ms": lat["mean_ms"],
        "max_ms": max(latencies, default=math.nan) * 1000,
        **count_changes(changes),
        "load_waits": sum(1 for o in ok if load_s > 0 and o.load_wait_s >= load_s / 2),
        "by_backend": dict(Counter(o.backend or "?" for o in ok)),
        "by_model": {m: dict(c) for m, c in sorted(by_model.items())},
        "p95_ms_by_model": {
            m: percentile([o.latency_s for o in ok if o.model == m], 95) * 1000
            for m in sorted(by_model)
        },
    }


def ratio(results: dict[str, dict[str, Any]], metric: str, name: str) -> float:
    """Round robin's ``metric`` ÷ ``name``'s: how many times fewer (or lower) ``name`` has.
    Infinite when ``name`` has none; NaN when either is missing."""
    base = _num(results.get(BASELINE, {}).get(metric))
    other = _num(results.get(name, {}).get(metric))
    if math.isnan(base) or math.isnan(other):
        return math.nan
    if other == 0:
        return math.inf if base > 0 else math.nan
    return base / other


def verdicts(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Affinity on against round robin: at least 5 times fewer cold loads, a lower p95."""
    loads = ratio(results, "cold_loads", CHALLENGER)
    p95 = ratio(results, "p95_ms", CHALLENGER)
    return {
        "baseline": BASELINE,
        "challenger": CHALLENGER,
        "cold_load_ratio": loads,
        "pass_cold_loads": None if math.isnan(loads) else loads >= MIN_COLD_LOAD_RATIO,
        "p95_ratio": p95,
        "pass_p95": None if math.isnan(p95) else p95 > 1.0,
    }


# (header, result key or a ratio's metric, format); None as the key: computed in _row.
HEADERS = [
    "configuration",
    "strategy",
    "affinity",
    "requests",
    "errors",
    "req/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "cold loads",
    "waited for a load",
    "RR ÷ this: cold loads",
    "RR ÷ this: p95",
]


def _row(results: dict[str, dict[str, Any]], name: str) -> list[str]:
    r = results[name]
    strategy, affinity, label = CONFIGS.get(name, (r.get("strategy", "?"), False, name))
    return [
        label,
        strategy,
        "on" if affinity else "off",
        fmt(r.get("requests"), "{:,}"),
        fmt(r.get("errors"), "{:,}"),
        fmt(r.get("throughput_rps"), "{:.2f}"),
        fmt(r.get("p50_ms"), "{:,.0f}"),
        fmt(r.get("p95_ms"), "{:,.0f}"),
        fmt(r.get("p99_ms"), "{:,.0f}"),
        fmt(r.get("cold_loads"), "{:,}"),
        fmt(r.get("load_waits"), "{:,}"),
        fmt(ratio(results, "cold_loads", name), "{:.1f}×"),
        fmt(ratio(results, "p95_ms", name), "{:.2f}×"),
    ]


def verdict_lines(ver: dict[str, Any]) -> list[tuple[str, bool | None]]:
    """The two goals as sentences, with their verdicts."""
    return [
        (
            f"cold loads, round robin ÷ affinity on: {fmt(ver['cold_load_ratio'], '{:.1f}×')} "
            f"(goal ≥ {MIN_COLD_LOAD_RATIO:g}×): {mark(ver['pass_cold_loads'])}",
            ver["pass_cold_loads"],
        ),
        (
            f"p95, round robin ÷ affinity on: {fmt(ver['p95_ratio'], '{:.2f}×')} "
            f"(goal > 1×, a lower p95): {mark(ver['pass_p95'])}",
            ver["pass_p95"],
        ),
    ]


def markdown(
    results: dict[str, dict[str, Any]], ver: dict[str, Any], notes: Sequence[str] = ()
) -> str:
    """The table and the verdicts in GitHub markdown, for the README."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|---|---|" + "---:|" * (len(HEADERS) - 3)]
    lines += ["| " + " | ".join(_row(results, n)) + " |" for n in results]
    lines.append("")
    lines += [f"- {text}" for text, _ in verdict_lines(ver)]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)
