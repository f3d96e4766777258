"""The scale benchmark's arithmetic and tables: the hold window, line delays, the loop probe,
the goals and their verdicts. Pure functions, so tests/bench/test_bench_scale.py can check them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from _report import fmt, mark
from _stats import percentile

# Goals of issue 8, item 4; the per-chunk CPU bar is perf-reliability.md §E's.
MAX_RSS_MB = 300.0
MAX_LOOP_P99_MS = 10.0
MAX_ROUTING_US = 50.0
MAX_CHUNK_CPU_US = 50.0


def hold_window(clients: Sequence[dict[str, Any]], settle_s: float) -> tuple[float, float]:
    """[every stream open + ``settle_s``, the first stream's end]: the time every stream of
    every client process was held at once. Empty (end ≤ start) when they never all were."""
    start = max((c["last_first_s"] for c in clients), default=0.0) + settle_s
    end = min((c["first_end_s"] for c in clients), default=0.0)
    return start, end


def pairs_in(pairs: Sequence[float], start_s: float, end_s: float) -> list[float]:
    """The delays (ms) of the lines that arrived in [start_s, end_s]; ``pairs`` is flat:
    arrival, delay, arrival, delay, ..."""
    return [pairs[i + 1] for i in range(0, len(pairs) - 1, 2) if start_s <= pairs[i] <= end_s]


def spread(values_ms: Sequence[float]) -> dict[str, float]:
    """count, p50, p99, p99.9 and max of values in milliseconds (NaN when empty)."""
    data = sorted(values_ms)
    return {
        "count": len(data),
        "p50_ms": percentile(data, 50),
        "p99_ms": percentile(data, 99),
        "p999_ms": percentile(data, 99.9),
        "max_ms": data[-1] if data else math.nan,
    }


def probes_in(
    probes: Sequence[tuple[float, float | None]], start_s: float, end_s: float
) -> dict[str, float]:
    """The loop probe in [start_s, end_s]: latency spread (ms) and failed probes (None)."""
    inside = [lat for t, lat in probes if start_s <= t <= end_s]
    out = spread([lat * 1000 for lat in inside if lat is not None])
    out["failed"] = sum(lat is None for lat in inside)
    return out


def added(corral: dict[str, Any], direct: dict[str, Any], key: str) -> float:
    """corral's value minus direct's for one metric of the line delays."""
    return float(corral["delay"][key] - direct["delay"][key])


def routing_verdict(rows: Sequence[dict[str, Any]], backends: int) -> dict[str, Any]:
    """The slowest strategy's acquire+release median at ``backends``, per fleet shape."""
    out: dict[str, Any] = {}
    for shape in sorted({r["shape"] for r in rows if r["backends"] == backends}):
        cells = [r for r in rows if r["backends"] == backends and r["shape"] == shape]
        worst = max(cells, key=lambda r: r["acquire"]["p50_us"])
        out[shape] = {"strategy": worst["strategy"], "p50_us": worst["acquire"]["p50_us"]}
    return out


def goals(result: dict[str, Any]) -> list[tuple[str, str, float, str, bool | None]]:
    """(goal, target, measured, format, verdict) rows; verdict None when not measured."""
    held = result["phases"].get("corral", {})
    rows: list[tuple[str, str, float, str, bool | None]] = []

    def row(name: str, target: str, value: float, spec: str, limit: float) -> None:
        ok = None if not math.isfinite(value) else value < limit
        rows.append((name, target, value, spec, ok))

    n = result["streams"]
    row(
        f"corral RSS, peak while {n:,} streams are held",
        "< 300 MB",
        held.get("rss_peak_mb", math.nan),
        "{:.0f} MB",
        MAX_RSS_MB,
    )
    row(
        "loop responsiveness p99 (GET / every 10 ms) while held",
        "< 10 ms",
        held.get("probe", {}).get("p99_ms", math.nan),
        "{:.2f} ms",
        MAX_LOOP_P99_MS,
    )
    for shape, v in result.get("routing_worst", {}).items():
        row(
            f"routing at {result['backends']} backends ({shape}), slowest strategy's "
            f"acquire+release p50 ({v['strategy']})",
            "< 50 µs",
            v["p50_us"],
            "{:.1f} µs",
            MAX_ROUTING_US,
        )
    row(
        "corral CPU per chunk while held (perf-reliability §E)",
        "< 50 µs",
        held.get("cpu_us_per_chunk", math.nan),
        "{:.1f} µs",
        MAX_CHUNK_CPU_US,
    )
    all_held = held.get("held", 0)
    rows.append(
        (
            "streams held at once through corral",
            f"{n:,}",
            float(all_held),
            "{:,.0f}",
            None if not held else all_held == n,
        )
    )
    return rows


def goals_markdown(result: dict[str, Any]) -> str:
    lines = ["| goal | target | measured | verdict |", "|---|---|---:|---|"]
    for name, target, value, spec, ok in goals(result):
        lines.append(f"| {name} | {target} | {fmt(value, spec)} | {mark(ok)} |")
    return "\n".join(lines)


PHASE_COLUMNS = [
    # (header, getter, format)
    ("streams complete", lambda p: p["complete"], "{:,.0f}"),
    ("errors", lambda p: p["errors"], "{:,.0f}"),
    ("held s", lambda p: p["window_s"], "{:.1f}"),
    ("TTFB p50 ms", lambda p: p["ttfb"]["p50_ms"], "{:,.1f}"),
    ("TTFB p99 ms", lambda p: p["ttfb"]["p99_ms"], "{:,.1f}"),
    ("lines/s held", lambda p: p["lines_per_s"], "{:,.0f}"),
    ("line delay p50 ms", lambda p: p["delay"]["p50_ms"], "{:.2f}"),
    ("line delay p99 ms", lambda p: p["delay"]["p99_ms"], "{:.2f}"),
    ("probe p50 ms", lambda p: p["probe"]["p50_ms"], "{:.2f}"),
    ("probe p99 ms", lambda p: p["probe"]["p99_ms"], "{:.2f}"),
    ("corral RSS MB", lambda p: p["rss_peak_mb"], "{:.0f}"),
    ("corral CPU", lambda p: p["cpu_share"], "{:.0%}"),
    ("clients CPU", lambda p: p["client_cpu_share"], "{:.0%}"),
    ("machine busy", lambda p: p["machine_busy"], "{:.0%}"),
    ("CPU pressure", lambda p: p["cpu_pressure"], "{:.0%}"),
]


def phases_markdown(phases: dict[str, dict[str, Any]]) -> str:
    """Direct and through corral side by side, then the difference."""
    lines = ["| target | " + " | ".join(h for h, _, _ in PHASE_COLUMNS) + " |"]
    lines.append("|---|" + "---:|" * len(PHASE_COLUMNS))
    for name, p in phases.items():
        lines.append(f"| {name} | " + " | ".join(fmt(g(p), s) for _, g, s in PHASE_COLUMNS) + " |")
    if {"direct", "corral"} <= phases.keys():
        d, c = phases["direct"], phases["corral"]
        lines += [
            "",
            f"- per-chunk latency added by corral: p50 {fmt(added(c, d, 'p50_ms'), '{:+.2f}')} ms,"
            f" p99 {fmt(added(c, d, 'p99_ms'), '{:+.2f}')} ms,"
            f" p99.9 {fmt(added(c, d, 'p999_ms'), '{:+.2f}')} ms",
        ]
    return "\n".join(lines)


def routing_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One row per strategy: acquire+release p50 / p99 (µs) per fleet size and shape."""
    cols = sorted({(r["backends"], r["shape"]) for r in rows})
    lines = [
        "| strategy | "
        + " | ".join(f"{n} backends, {shape}: p50 / p99 µs" for n, shape in cols)
        + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for strategy in sorted({r["strategy"] for r in rows}):
        cells = []
        for n, shape in cols:
            hit = [
                r
                for r in rows
                if r["strategy"] == strategy and r["backends"] == n and r["shape"] == shape
            ]
            a = hit[0]["acquire"] if hit else {}
            cells.append(f"{fmt(a.get('p50_us'), '{:.1f}')} / {fmt(a.get('p99_us'), '{:.1f}')}")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def e2e_markdown(e2e: dict[str, dict[str, Any]]) -> str:
    """corral's CPU per request at a fixed rate, with few and many backends registered."""
    lines = [
        "| backends | idle CPU (health checks) | req/s | p50 ms | p99 ms | errors "
        "| CPU µs/req | CPU µs/req net of idle |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in e2e.items():
        lines.append(
            f"| {n} | {fmt(r['idle_cpu_share'], '{:.1%}')} | {fmt(r['rps'], '{:.0f}')} "
            f"| {fmt(r['p50_ms'], '{:.2f}')} | {fmt(r['p99_ms'], '{:.2f}')} | {r['errors']} "
            f"| {fmt(r['cpu_us_per_request'], '{:.0f}')} "
            f"| {fmt(r['net_us_per_request'], '{:.0f}')} |"
        )
    return "\n".join(lines)


def per_request(
    cpu_s: float, idle_share: float, window_s: float, requests: int
) -> tuple[float, float]:
    """(raw, net of the idle background) CPU µs per request."""
    if requests <= 0:
        return math.nan, math.nan
    raw = cpu_s / requests * 1e6
    net = (cpu_s - idle_share * window_s) / requests * 1e6
    return raw, net
