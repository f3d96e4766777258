"""The soak's arithmetic, verdicts, table and plot. Pure but for :func:`plot`, which writes PNGs
with matplotlib (the ``bench`` extra)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _report import fmt, mark
from _sampler import MB, Sample
from _soak_load import COMPLETE, ERROR, UNANSWERED, Outcome
from _stats import percentile

MAX_RSS_GROWTH = 0.10
WINDOW_S = 5.0


@dataclass(frozen=True)
class Fault:
    """One injected fault: what, on which simulator, from when to when (s since zero)."""

    name: str
    target: str
    start_s: float
    end_s: float


def windows(outcomes: Sequence[Outcome], end_s: float, width_s: float = WINDOW_S) -> list[dict]:
    """Per window of ``width_s`` (by when requests ended): complete and error rates, and the
    p50 / p95 latency of the complete ones (NaN when none)."""
    count = max(1, int(end_s // width_s + (end_s % width_s > 1e-9)))
    buckets: list[list[Outcome]] = [[] for _ in range(count)]
    for o in outcomes:
        i = min(count - 1, max(0, int(o.done_s // width_s)))
        buckets[i].append(o)
    out = []
    for i, bucket in enumerate(buckets):
        done = [o.latency_s * 1000 for o in bucket if o.verdict == COMPLETE]
        out.append(
            {
                "start_s": i * width_s,
                "complete_rps": len(done) / width_s,
                "error_rps": sum(o.verdict == ERROR for o in bucket) / width_s,
                "unanswered": sum(o.verdict == UNANSWERED for o in bucket),
                "p50_ms": percentile(done, 50),
                "p95_ms": percentile(done, 95),
            }
        )
    return out


def rss_around(samples: Sequence[Sample], start_s: float, end_s: float) -> float:
    """The median RSS (bytes) of the samples in [start_s, end_s]; NaN when none."""
    inside = [s.rss_bytes for s in samples if start_s <= s.t_s <= end_s]
    return float(statistics.median(inside)) if inside else float("nan")


def rss_growth(
    samples: Sequence[Sample], warmup_s: float, end_s: float, span_s: float = 5.0
) -> dict[str, float]:
    """RSS just after the warm-up and at the end (medians over ``span_s``), and the growth."""
    after_warmup = rss_around(samples, warmup_s, warmup_s + span_s)
    at_end = rss_around(samples, end_s - span_s, end_s)
    return {
        "rss_warm_mb": after_warmup / MB,
        "rss_end_mb": at_end / MB,
        "rss_peak_mb": max((s.rss_bytes for s in samples), default=0) / MB,
        "rss_growth": at_end / after_warmup - 1 if after_warmup > 0 else float("nan"),
    }


def summarize(outcomes: Sequence[Outcome], skipped: int, duration_s: float) -> dict[str, Any]:
    """Counts by verdict, the reasons, overall latency of the complete requests, per kind."""
    verdicts = Counter(o.verdict for o in outcomes)
    done = [o.latency_s * 1000 for o in outcomes if o.verdict == COMPLETE]
    return {
        "requests": len(outcomes),
        "skipped": skipped,
        "complete": verdicts[COMPLETE],
        "errors": verdicts[ERROR],
        "unanswered": verdicts[UNANSWERED],
        "throughput_rps": len(done) / duration_s if duration_s > 0 else 0.0,
        "p50_ms": percentile(done, 50),
        "p95_ms": percentile(done, 95),
        "p99_ms": percentile(done, 99),
        "error_kinds": dict(Counter(o.why for o in outcomes if o.verdict == ERROR).most_common(8)),
        "unanswered_kinds": dict(
            Counter(o.why for o in outcomes if o.verdict == UNANSWERED).most_common(8)
        ),
        "by_kind": {
            kind: dict(Counter(o.verdict for o in outcomes if o.kind == kind))
            for kind in sorted({o.kind for o in outcomes})
        },
    }


def verdicts(summary: dict[str, Any], memory: dict[str, float]) -> dict[str, bool | None]:
    growth = memory["rss_growth"]
    return {
        "pass_rss": None if growth != growth else growth < MAX_RSS_GROWTH,
        "pass_answered": summary["requests"] > 0 and summary["unanswered"] == 0,
    }


def markdown(summary: dict[str, Any], memory: dict[str, float], faults: Sequence[Fault]) -> str:
    v = verdicts(summary, memory)
    lines = [
        "| goal | target | measured | verdict |",
        "|---|---|---:|---|",
        f"| RSS growth, end vs after warm-up ({fmt(memory['rss_warm_mb'], '{:.0f}')} → "
        f"{fmt(memory['rss_end_mb'], '{:.0f}')} MB) | < 10% "
        f"| {fmt(memory['rss_growth'], '{:+.1%}')} | {mark(v['pass_rss'])} |",
        f"| unanswered requests (hung or cut without an error) | 0 "
        f"| {summary['unanswered']} of {summary['requests']:,} | {mark(v['pass_answered'])} |",
        "",
        "| requests | complete | clear errors | unanswered | skipped (client cap) | req/s "
        "| p50 ms | p95 ms | p99 ms | peak RSS MB | faults |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary['requests']:,} | {summary['complete']:,} | {summary['errors']:,} "
        f"| {summary['unanswered']} | {summary['skipped']} "
        f"| {fmt(summary['throughput_rps'], '{:.1f}')} | {fmt(summary['p50_ms'], '{:,.0f}')} "
        f"| {fmt(summary['p95_ms'], '{:,.0f}')} | {fmt(summary['p99_ms'], '{:,.0f}')} "
        f"| {fmt(memory['rss_peak_mb'], '{:.0f}')} | {len(faults)} |",
    ]
    for title, kinds in (("clear errors", "error_kinds"), ("unanswered", "unanswered_kinds")):
        if summary[kinds]:
            lines += ["", f"{title}, most frequent:"]
            lines += [f"- {n} × {why}" for why, n in summary[kinds].items()]
    return "\n".join(lines)


FAULT_COLORS = {
    "kill": "tab:red",
    "errors": "tab:orange",
    "hang": "tab:purple",
    "drop": "tab:brown",
    "slow": "tab:olive",
}


def plot(
    wins: Sequence[dict[str, Any]],
    samples: Sequence[Sample],
    faults: Sequence[Fault],
    title: str,
    paths: Sequence[tuple[Path, tuple[float, float], int]],
) -> None:
    """Three panels (req/s, latency p50/p95, RSS) with the faults shaded; one PNG per
    (path, size in inches, dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mid = [w["start_s"] + WINDOW_S / 2 for w in wins]
    fig, (ax_rps, ax_lat, ax_rss) = plt.subplots(3, 1, sharex=True, figsize=paths[0][1])
    ax_rps.plot(mid, [w["complete_rps"] for w in wins], label="complete", color="tab:blue")
    ax_rps.plot(mid, [w["error_rps"] for w in wins], label="clear errors", color="tab:orange")
    bad = [(m, w["unanswered"]) for m, w in zip(mid, wins, strict=True) if w["unanswered"]]
    if bad:
        ax_rps.scatter(*zip(*bad, strict=True), color="black", marker="x", label="unanswered")
    ax_rps.set_ylabel("req/s")
    ax_lat.plot(mid, [w["p50_ms"] for w in wins], label="p50", color="tab:green")
    ax_lat.plot(mid, [w["p95_ms"] for w in wins], label="p95", color="tab:red")
    ax_lat.set_ylabel("latency ms")
    ax_rss.plot([s.t_s for s in samples], [s.rss_bytes / MB for s in samples], color="tab:gray")
    ax_rss.set_ylabel("corral RSS MB")
    ax_rss.set_xlabel(f"seconds ({WINDOW_S:g}-s windows)")
    seen: set[str] = set()
    for f in faults:
        color = FAULT_COLORS.get(f.name, "tab:pink")
        for ax in (ax_rps, ax_lat, ax_rss):
            label = f"fault: {f.name}" if ax is ax_rps and f.name not in seen else None
            ax.axvspan(f.start_s, f.end_s, color=color, alpha=0.15, label=label)
        seen.add(f.name)
    for ax in (ax_rps, ax_lat):
        ax.set_ylim(0, ax.get_ylim()[1] * 1.4)  # room for the legend above the lines
        ax.legend(loc="upper left", fontsize="x-small", ncol=4)
    peak = max((s.rss_bytes for s in samples), default=0) / MB
    ax_rss.set_ylim(0, max(1.0, peak * 1.2))
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    for path, size, dpi in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.set_size_inches(*size)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
