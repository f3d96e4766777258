"""bench/balance.py's arithmetic and tables: one configuration's outcome, the verdicts, the rich
table and the markdown. Pure functions, no I/O but printing, so tests/bench can check them."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from _report import fmt, mark
from _stats import percentile, summarize_latencies

# Goals from the issue.
MIN_SHARE_OF_IDEAL = 0.90
MIN_P99_GAIN = 2.0
BASELINE = ("round_robin", False)  # round robin without the central queue
CHALLENGER = ("least_connections", True)  # compared with it on p99


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it. Times in seconds from the start of the schedule."""

    scheduled_s: float
    sent_s: float
    done_s: float
    status: int  # 0: no HTTP answer (transport error or timeout)
    backend: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def capacity(num_parallel: int, service_s: float) -> float:
    """Requests per second a backend sustains: its slots over one request's service time."""
    if service_s <= 0 or num_parallel <= 0:
        raise ValueError("service time and slots must be positive")
    return num_parallel / service_s


def summarize(
    outcomes: Sequence[Outcome],
    *,
    offered: int,
    cut: int,
    window_s: float,
    ideal_rps: float,
    fast_id: str,
) -> dict[str, Any]:
    """One configuration's numbers.

    Latency runs from each request's *scheduled* arrival to its response (so a late generator
    cannot hide queueing). Throughput is completed requests over the wall time from the
    schedule's start until the later of the window's end and the last response (window +
    drain).
    """
    ok = [o for o in outcomes if o.ok]
    lat = summarize_latencies([o.done_s - o.scheduled_s for o in ok])
    last = max((o.done_s for o in outcomes), default=0.0)
    wall = max(window_s, last)
    errors: Counter[str] = Counter()
    for o in outcomes:
        if not o.ok:
            errors[o.error or f"status {o.status}"] += 1
    by_backend = Counter(o.backend or "?" for o in ok)
    lag = [max(0.0, o.sent_s - o.scheduled_s) for o in outcomes]
    rps = len(ok) / wall if wall > 0 else 0.0
    return {
        "offered": offered,
        "completed": len(ok),
        "errors": errors.total(),
        "rejected_503": sum(1 for o in outcomes if o.status == 503),
        "error_kinds": dict(errors.most_common(5)),
        "cut": cut,
        "wall_s": wall,
        "drain_s": max(0.0, last - window_s),
        "throughput_rps": rps,
        "share_of_ideal": rps / ideal_rps if ideal_rps > 0 else math.nan,
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "mean_ms": lat["mean_ms"],
        "max_ms": max((o.done_s - o.scheduled_s for o in ok), default=math.nan) * 1000,
        "fast_share": by_backend.get(fast_id, 0) / len(ok) if ok else math.nan,
        "by_backend": dict(by_backend),
        "send_lag_p99_ms": percentile(lag, 99) * 1000 if lag else math.nan,
        "send_lag_max_ms": max(lag, default=math.nan) * 1000,
    }


def key(strategy: str, queue: bool) -> str:
    return f"{strategy}+{'queue' if queue else 'direct'}"


def verdicts(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals: the best queued configuration's share of the ideal throughput,
    and least_connections with the queue against round robin without it on p99."""
    queued = {k: r for k, r in results.items() if r.get("queue")}
    best = max(
        queued,
        key=lambda k: _num(queued[k].get("share_of_ideal")),
        default=None,
    )
    best_share = _num(queued[best]["share_of_ideal"]) if best else math.nan
    base = results.get(key(*BASELINE), {})
    chal = results.get(key(*CHALLENGER), {})
    gain = _num(base.get("p99_ms")) / _num(chal.get("p99_ms"))
    return {
        "best_queued": best,
        "best_queued_share": best_share,
        "pass_share": None if math.isnan(best_share) else best_share >= MIN_SHARE_OF_IDEAL,
        "baseline": key(*BASELINE),
        "challenger": key(*CHALLENGER),
        "p99_gain": gain,
        "pass_p99": None if math.isnan(gain) else gain >= MIN_P99_GAIN,
    }


def p99_gain(results: dict[str, dict[str, Any]], name: str) -> float:
    """How many times lower ``name``'s p99 is than the baseline's (round robin, no queue)."""
    base = _num(results.get(key(*BASELINE), {}).get("p99_ms"))
    return base / _num(results.get(name, {}).get("p99_ms"))


def _num(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


# (result key, header, format); the first two columns are the configuration itself.
COLUMNS: list[tuple[str, str, str]] = [
    ("completed", "completed", "{:,.0f}"),
    ("errors", "errors/503", "{:.0f}"),
    ("throughput_rps", "req/s", "{:.2f}"),
    ("share_of_ideal", "share of ideal", "{:.3f}"),
    ("p50_ms", "p50 ms", "{:,.0f}"),
    ("p99_ms", "p99 ms", "{:,.0f}"),
    ("p99_gain", "p99 gain vs RR direct", "{:.1f}×"),
    ("fast_share", "on fast", "{:.0%}"),
    ("drain_s", "drain s", "{:.1f}"),
]


def _row(results: dict[str, dict[str, Any]], name: str) -> list[str]:
    r = results[name]
    cells = [r["strategy"], "yes" if r["queue"] else "no"]
    for k, _, spec in COLUMNS:
        value = p99_gain(results, name) if k == "p99_gain" else r.get(k)
        if k == "errors":
            value = _num(r.get("errors")) + _num(r.get("cut", 0))
        cells.append(fmt(value, spec))
    return cells


def _headers() -> list[str]:
    return ["strategy", "central queue", *(h for _, h, _ in COLUMNS)]


def _verdict_lines(ver: dict[str, Any]) -> list[str]:
    return [
        f"best queued configuration: {ver['best_queued']}, "
        f"{fmt(ver['best_queued_share'], '{:.3f}')} of ideal throughput "
        f"(goal ≥ {MIN_SHARE_OF_IDEAL:.2f}): {mark(ver['pass_share'])}",
        f"p99 of {ver['baseline']} ÷ p99 of {ver['challenger']}: "
        f"{fmt(ver['p99_gain'], '{:.1f}×')} (goal ≥ {MIN_P99_GAIN:g}×): {mark(ver['pass_p99'])}",
    ]


def markdown(
    results: dict[str, dict[str, Any]], ver: dict[str, Any], notes: Sequence[str] = ()
) -> str:
    headers = _headers()
    lines = ["| " + " | ".join(headers) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(results, n)) + " |" for n in results]
    lines.append("")
    lines += [f"- {line}" for line in [*_verdict_lines(ver), *notes]]
    return "\n".join(lines)


def print_table(
    results: dict[str, dict[str, Any]], ver: dict[str, Any], title: str, notes: Sequence[str] = ()
) -> None:
    """The table with rich (wide enough not to wrap), or as markdown without it."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(results, ver, notes))
        return
    console = Console(width=200)
    table = Table(title=title)
    for i, header in enumerate(_headers()):
        table.add_column(header, justify="left" if i < 2 else "right")
    for name in results:
        table.add_row(*_row(results, name))
    console.print(table)
    for line, ok in zip(_verdict_lines(ver), (ver["pass_share"], ver["pass_p99"]), strict=True):
        style = "green" if ok else ("red" if ok is False else "dim")
        console.print(f"[{style}]{line}[/{style}]")
    for line in notes:
        console.print(line)
