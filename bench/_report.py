"""Turning rounds into medians, ratios and verdicts; the rich table and the markdown table."""

from __future__ import annotations

import math
from typing import Any

from _stats import median_of

# Targets from the issue.
MAX_ADDED_P50_MS = 1.0
MIN_RPS_VS_NGINX = 0.2
MIN_CHUNKS_VS_DIRECT = 0.97
# Direct must serve this many times nginx's req/s, or the backends (not nginx) may cap nginx.
MIN_DIRECT_VS_NGINX = 3.0

Medians = dict[str, dict[str, dict[str, float]]]  # target -> phase -> metric -> median

# The streaming phases: phase -> (the API streamed, its label in the tables).
STREAMS = {
    "stream_chat": ("/api/chat", "/api/chat NDJSON"),
    "stream_v1": ("/v1/chat/completions", "/v1 SSE"),
}

COLUMNS = [
    # (phase, metric, header, format): the non-streaming table, one row per target
    ("saturated", "rps", "req/s", "{:,.0f}"),
    ("saturated", "p50_ms", "p50 ms", "{:.2f}"),
    ("saturated", "p99_ms", "p99 ms", "{:.2f}"),
    ("saturated", "cpu_us_per_request", "CPU µs/req", "{:.0f}"),
    ("paced", "p50_ms", "paced p50 ms", "{:.2f}"),
    ("paced", "p99_ms", "paced p99 ms", "{:.2f}"),
    ("unloaded", "p50_ms", "1-conn p50 ms", "{:.3f}"),
]

STREAM_COLUMNS = [
    # (metric, header, format): the streaming table, one row per target and API
    ("chunks_per_s", "chunks/s", "{:,.0f}"),
    ("ttfb_p50_ms", "TTFB p50 ms", "{:.2f}"),
    ("ttfb_p99_ms", "TTFB p99 ms", "{:.2f}"),
    ("answer_p50_ms", "answer p50 ms", "{:.1f}"),
    ("answer_p99_ms", "answer p99 ms", "{:.1f}"),
    ("cpu_us_per_chunk", "CPU µs/chunk", "{:.1f}"),
]

RATIOS = [
    # (key, verdict key or None, header, format): non-streaming, against nginx and direct
    ("rps_vs_nginx", "pass_rps", f"req/s ÷ nginx (≥ {MIN_RPS_VS_NGINX:g})", "{:.3f}×"),
    (
        "added_p50_paced_ms",
        "pass_p50_paced",
        f"added paced p50 ms (≤ {MAX_ADDED_P50_MS:g})",
        "{:+.2f}",
    ),
    ("added_p50_unloaded_ms", "pass_p50_unloaded", "added 1-conn p50 ms", "{:+.3f}"),
    ("added_p50_saturated_ms", "pass_p50_saturated", "added saturated p50 ms", "{:+.2f}"),
]

STREAM_RATIOS = [
    # (key, verdict key or None, header, format): per streamed API, against direct
    (
        "chunks_vs_direct",
        "pass_chunks",
        f"chunks/s ÷ direct (≥ {MIN_CHUNKS_VS_DIRECT:g})",
        "{:.3f}×",
    ),
    ("added_answer_p50_ms", None, "added answer p50 ms", "{:+.2f}"),
    ("added_answer_p99_ms", None, "added answer p99 ms", "{:+.2f}"),
    ("added_ttfb_p50_ms", None, "added TTFB p50 ms", "{:+.2f}"),
    ("added_ttfb_p99_ms", None, "added TTFB p99 ms", "{:+.2f}"),
]


def medians(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per phase, the median over rounds of every numeric metric; errors are summed."""
    out: dict[str, dict[str, float]] = {}
    for phase, rounds in results.items():
        keys = {k for r in rounds for k, v in r.items() if isinstance(v, int | float)}
        out[phase] = {k: median_of(r.get(k, math.nan) for r in rounds) for k in keys}
        out[phase]["errors"] = sum(r.get("errors", 0) for r in rounds)
    return out


def _get(med: Medians, target: str, phase: str, metric: str) -> float:
    return med.get(target, {}).get(phase, {}).get(metric, math.nan)


def verdicts(med: Medians) -> dict[str, dict[str, Any]]:
    """For every proxy but nginx: the ratios against direct and nginx, and PASS (True) / MISS;
    per streamed API under ``"streams"``."""
    out: dict[str, dict[str, Any]] = {}
    has_nginx = "nginx" in med
    for name in med:
        if name in ("direct", "nginx"):
            continue

        def added(phase: str, metric: str = "p50_ms", name: str = name) -> float:
            return _get(med, name, phase, metric) - _get(med, "direct", phase, metric)

        rps = _get(med, name, "saturated", "rps")
        v: dict[str, Any] = {
            "rps_vs_nginx": rps / _get(med, "nginx", "saturated", "rps") if has_nginx else None,
            "rps_vs_direct": rps / _get(med, "direct", "saturated", "rps"),
            "added_p50_paced_ms": added("paced"),
            "added_p50_unloaded_ms": added("unloaded"),
            "added_p50_saturated_ms": added("saturated"),
        }
        v["pass_rps"] = None if v["rps_vs_nginx"] is None else v["rps_vs_nginx"] >= MIN_RPS_VS_NGINX
        for phase in ("paced", "unloaded", "saturated"):
            value = v[f"added_p50_{phase}_ms"]
            v[f"pass_p50_{phase}"] = None if math.isnan(value) else value <= MAX_ADDED_P50_MS
        streams: dict[str, dict[str, Any]] = {}
        for phase in STREAMS:
            if phase not in med.get(name, {}):
                continue
            chunks = _get(med, name, phase, "chunks_per_s") / _get(
                med, "direct", phase, "chunks_per_s"
            )
            sv: dict[str, Any] = {"chunks_vs_direct": chunks}
            for metric in ("answer_p50_ms", "answer_p99_ms", "ttfb_p50_ms", "ttfb_p99_ms"):
                sv[f"added_{metric}"] = added(phase, metric)
            sv["pass_chunks"] = None if math.isnan(chunks) else chunks >= MIN_CHUNKS_VS_DIRECT
            streams[phase] = sv
        v["streams"] = streams
        out[name] = v
    return out


def direct_vs_nginx(med: Medians) -> float:
    """Direct's saturated req/s ÷ nginx's (NaN without either)."""
    return _get(med, "direct", "saturated", "rps") / _get(med, "nginx", "saturated", "rps")


def fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return spec.format(value)


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _cells(med: Medians, name: str) -> list[str]:
    return [fmt(_get(med, name, phase, key), spec) for phase, key, _, spec in COLUMNS]


def _stream_cells(med: Medians, name: str, phase: str) -> list[str]:
    return [fmt(_get(med, name, phase, key), spec) for key, _, spec in STREAM_COLUMNS]


def _ratio_cells(v: dict[str, Any], color: bool, ratios: list[Any] = RATIOS) -> list[str]:
    cells = []
    for key, verdict, _, spec in ratios:
        cell = fmt(v.get(key), spec)
        if verdict is not None:
            ok = v.get(verdict)
            text = mark(ok)
            if color:
                style = "green" if ok else ("red" if ok is False else "dim")
                text = f"[{style}]{text}[/{style}]"
            cell += f" {text}"
        cells.append(cell)
    return cells


def _stream_rows(med: Medians) -> list[tuple[str, str, str]]:
    """(target, phase, API label) of every streaming row."""
    return [
        (name, phase, label)
        for phase, (_, label) in STREAMS.items()
        for name in med
        if phase in med[name]
    ]


def _ratio_note(med: Medians) -> str:
    ratio = direct_vs_nginx(med)
    if not math.isfinite(ratio):
        return ""
    verdict = "PASS" if ratio >= MIN_DIRECT_VS_NGINX else "MISS"
    return (
        f"direct ÷ nginx req/s: {ratio:.2f}× (≥ {MIN_DIRECT_VS_NGINX:g}× shows the backends "
        f"do not cap nginx): {verdict}"
    )


def markdown(med: Medians, ver: dict[str, dict[str, Any]]) -> str:
    """The four tables in GitHub markdown, for the README."""
    lines = ["| target | " + " | ".join(h for _, _, h, _ in COLUMNS) + " |"]
    lines.append("|---|" + "---:|" * len(COLUMNS))
    lines += [f"| {n} | " + " | ".join(_cells(med, n)) + " |" for n in med]
    rows = _stream_rows(med)
    if rows:
        lines += ["", "| target | stream | " + " | ".join(h for _, h, _ in STREAM_COLUMNS) + " |"]
        lines.append("|---|---|" + "---:|" * len(STREAM_COLUMNS))
        lines += [
            f"| {n} | {label} | " + " | ".join(_stream_cells(med, n, phase)) + " |"
            for n, phase, label in rows
        ]
    lines += ["", "| vs | " + " | ".join(h for _, _, h, _ in RATIOS) + " |"]
    lines.append("|---|" + "---:|" * len(RATIOS))
    lines += [f"| {n} | " + " | ".join(_ratio_cells(v, False)) + " |" for n, v in ver.items()]
    srows = [(n, p, label) for n, p, label in rows if p in ver.get(n, {}).get("streams", {})]
    if srows:
        lines += ["", "| vs | stream | " + " | ".join(h for _, _, h, _ in STREAM_RATIOS) + " |"]
        lines.append("|---|---|" + "---:|" * len(STREAM_RATIOS))
        lines += [
            f"| {n} | {label} | "
            + " | ".join(_ratio_cells(ver[n]["streams"][p], False, STREAM_RATIOS))
            + " |"
            for n, p, label in srows
        ]
    note = _ratio_note(med)
    if note:
        lines += ["", f"- {note}"]
    return "\n".join(lines)


def print_tables(med: Medians, ver: dict[str, dict[str, Any]]) -> None:
    """The tables with rich (wide enough not to wrap), or as markdown without it."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(med, ver))
        return
    console = Console(width=200)
    table = Table(title="non-streaming /api/generate: medians of the rounds")
    table.add_column("target")
    for _, _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("errors", justify="right")
    for name in med:
        errors = sum(p.get("errors", 0) for p in med[name].values())
        table.add_row(name, *_cells(med, name), str(int(errors)))
    console.print(table)
    rows = _stream_rows(med)
    if rows:
        streams = Table(title="streams: medians of the rounds")
        streams.add_column("target")
        streams.add_column("stream")
        for _, header, _ in STREAM_COLUMNS:
            streams.add_column(header, justify="right")
        for name, phase, label in rows:
            streams.add_row(name, label, *_stream_cells(med, name, phase))
        console.print(streams)
    ratios = Table(title="against the targets")
    ratios.add_column("vs")
    for _, _, header, _ in RATIOS:
        ratios.add_column(header, justify="right")
    for name, v in ver.items():
        ratios.add_row(name, *_ratio_cells(v, True))
    console.print(ratios)
    srows = [(n, p, label) for n, p, label in rows if p in ver.get(n, {}).get("streams", {})]
    if srows:
        sratios = Table(title="streams against direct")
        sratios.add_column("vs")
        sratios.add_column("stream")
        for _, _, header, _ in STREAM_RATIOS:
            sratios.add_column(header, justify="right")
        for name, phase, label in srows:
            sratios.add_row(
                name, label, *_ratio_cells(ver[name]["streams"][phase], True, STREAM_RATIOS)
            )
        console.print(sratios)
    note = _ratio_note(med)
    if note:
        console.print(note)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null, so ``json.dumps(allow_nan=False)`` takes it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
