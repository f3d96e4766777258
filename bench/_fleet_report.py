"""bench/fleet.py's numbers: one contender's summary from what its clients saw and what the
simulators counted, and the table. Pure functions, no I/O.

Times come in as wall seconds and go out as *real* ones (wall x time scale), the way a fleet
running at full speed would see them; the TTFT target is real too.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from _report import fmt
from _stats import percentile

# The simulators' scheduler counters summed over the fleet (GET /_sim/stats → "scheduler").
SCHEDULER_KEYS = (
    "loads",
    "reloads",
    "evictions",
    "prompt_tokens",
    "prompt_tokens_cached",
    "busy_s",
    "load_s",
)


@dataclass(frozen=True)
class Outcome:
    """One chat turn as its client saw it; wall seconds from the start of the run."""

    conversation: int
    turn: int
    model: str
    sent_s: float
    first_s: float | None  # first content token; None: none came
    done_s: float
    status: int  # 0: no HTTP answer
    error: str | None = None
    backend: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.first_s is not None

    @property
    def ttft_s(self) -> float:
        return math.nan if self.first_s is None else self.first_s - self.sent_s


def share(part: float, whole: float) -> float:
    """part ÷ whole; NaN when the whole is 0."""
    return part / whole if whole else math.nan


def within(values: Sequence[float], limit: float) -> float:
    """Share of ``values`` at or under ``limit`` (NaN for none)."""
    return share(sum(1 for v in values if v <= limit), len(values))


def scheduler_totals(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float] | None:
    """The scheduler counters summed over GPUs; None when a simulator has none."""
    totals = dict.fromkeys(SCHEDULER_KEYS, 0.0)
    for doc in stats.values():
        sched = doc.get("scheduler")
        if not isinstance(sched, Mapping):
            return None
        for key in SCHEDULER_KEYS:
            value = sched.get(key, 0)
            totals[key] += float(value) if isinstance(value, int | float) else 0.0
    return totals


def busy_shares(stats: Mapping[str, Mapping[str, Any]], wall_s: float) -> dict[str, float] | None:
    """Per GPU: the share of the run's wall time with at least one request on it."""
    out: dict[str, float] = {}
    for gpu, doc in stats.items():
        sched = doc.get("scheduler")
        if not isinstance(sched, Mapping) or not isinstance(sched.get("busy_s"), int | float):
            return None
        out[gpu] = share(float(sched["busy_s"]), wall_s)
    return out


def request_shares(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Per GPU: its share of the fleet's /api/chat requests."""
    counts = {gpu: int(doc.get("by_route", {}).get("/api/chat", 0)) for gpu, doc in stats.items()}
    total = sum(counts.values())
    return {gpu: share(n, total) for gpu, n in counts.items()}


def summarize(
    outcomes: Sequence[Outcome],
    *,
    planned: int,
    stats: Mapping[str, Mapping[str, Any]],
    ps_counts: Mapping[str, int],
    wall_s: float,
    time_scale: float,
    target_s: float,
) -> dict[str, Any]:
    """One contender's numbers. ``ps_counts``: cold loads and unloads counted from /api/ps
    samples, used when the simulators keep no scheduler counters."""
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft_s * time_scale for o in ok]
    follow = [o.ttft_s * time_scale for o in ok if o.turn > 0]
    errors: Counter[str] = Counter(o.error or f"status {o.status}" for o in outcomes if not o.ok)
    sched = scheduler_totals(stats)
    res: dict[str, Any] = {
        "planned": planned,
        "sent": len(outcomes),
        "completed": len(ok),
        "completed_share": share(len(ok), len(outcomes)),
        "errors": errors.total(),
        "error_kinds": dict(errors.most_common(5)),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "ttft_p99_s": percentile(ttft, 99),
        "within_target": within(ttft, target_s),
        "followup_ttft_p50_s": percentile(follow, 50),
        "first_turn_ttft_p50_s": percentile([o.ttft_s * time_scale for o in ok if o.turn == 0], 50),
        "wall_s": wall_s,
        "counters": "scheduler" if sched is not None else "api/ps samples",
        "request_share": request_shares(stats),
        "busy_share": busy_shares(stats, wall_s),
        "by_backend": dict(Counter(o.backend for o in ok if o.backend)),
    }
    if sched is not None:
        res.update(
            cold_loads=int(sched["loads"] + sched["reloads"]),
            reloads=int(sched["reloads"]),
            evictions=int(sched["evictions"]),
            prompt_tokens=int(sched["prompt_tokens"]),
            cache_share=share(sched["prompt_tokens_cached"], sched["prompt_tokens"]),
            load_s=sched["load_s"],
        )
    else:
        res.update(
            cold_loads=ps_counts.get("cold_loads", 0),
            reloads=None,
            evictions=None,
            unloads=ps_counts.get("unloads", 0),
            cache_share=math.nan,
        )
    return res


def _shares(values: Mapping[str, float] | None) -> str:
    if not values:
        return "–"
    return " / ".join(fmt(v * 100, "{:.0f}") for v in values.values())


HEADERS = [
    "contender",
    "completed / sent",
    "TTFT p50 s",
    "TTFT p95 s",
    "≤ target",
    "follow-up TTFT p50 s",
    "cold loads",
    "evictions",
    "prompt cache",
    "busy % per GPU",
    "requests % per GPU",
]


def row(name: str, r: Mapping[str, Any]) -> list[str]:
    evictions = r.get("evictions")
    if evictions is None and r.get("unloads") is not None:
        evictions = f"({r['unloads']} unloads)"
    return [
        name,
        f"{r['completed']:,} / {r['sent']:,}" + ("" if r["sent"] == r["planned"] else " *"),
        fmt(r["ttft_p50_s"], "{:.2f}"),
        fmt(r["ttft_p95_s"], "{:.2f}"),
        fmt(r["within_target"] * 100 if r["sent"] else math.nan, "{:.0f}%"),
        fmt(r["followup_ttft_p50_s"], "{:.2f}"),
        fmt(r["cold_loads"], "{:,}"),
        evictions if isinstance(evictions, str) else fmt(evictions, "{:,}"),
        fmt(r["cache_share"] * 100 if r["cache_share"] is not None else None, "{:.0f}%"),
        _shares(r.get("busy_share")),
        _shares(r.get("request_share")),
    ]


def markdown(results: Mapping[str, Mapping[str, Any]], notes: Sequence[str] = ()) -> str:
    """One run's table (one row per contender) in GitHub markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(row(n, r)) + " |" for n, r in results.items()]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def plain(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The same table with aligned columns, for a terminal."""
    rows = [HEADERS] + [row(n, r) for n, r in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    out = []
    for i, r in enumerate(rows):
        pairs = enumerate(zip(r, widths, strict=True))
        cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in pairs]
        out.append("  ".join(cells))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
