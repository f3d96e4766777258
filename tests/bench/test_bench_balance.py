"""The balance benchmark's arithmetic: arrival schedules, per-configuration summaries, verdicts.

Nothing here is timed; the benchmark itself never runs in CI.
"""

from __future__ import annotations

import itertools
import json
import math

import _balance_arrivals as arrivals
import _balance_model as model
import _balance_report as report
import _report
import pytest


def test_schedule_offers_exactly_the_mean_rate_in_the_window() -> None:
    """round(rate * duration) arrivals, sorted, all inside [0, duration]."""
    s = arrivals.bursty_schedule(14.8, 25, seed=3)
    assert s.count == 370
    assert s.times == sorted(s.times)
    assert all(0 <= t <= 25 for t in s.times)
    assert s.mean_rate == pytest.approx(14.8)


def test_schedule_is_reproducible_and_seeded() -> None:
    """The same seed gives the same arrivals (every configuration sees them); another differs."""
    a = arrivals.bursty_schedule(10, 20, seed=7)
    assert a.times == arrivals.bursty_schedule(10, 20, seed=7).times
    assert a.times != arrivals.bursty_schedule(10, 20, seed=8).times


def test_segments_cover_the_window_and_alternate() -> None:
    """On/off periods tile the window without gaps, never two of a kind in a row, start off."""
    s = arrivals.bursty_schedule(10, 30, seed=1)
    segs = s.segments
    assert segs[0].start_s == 0
    assert segs[0].on is False
    assert segs[-1].end_s == pytest.approx(30)
    for a, b in itertools.pairwise(segs):
        assert a.end_s == pytest.approx(b.start_s)
        assert a.on != b.on


def test_quiet_tail_has_no_burst() -> None:
    """The last quiet_tail_s seconds are "off", so no run ends in the middle of a burst."""
    for seed in range(20):
        s = arrivals.bursty_schedule(10, 15, seed=seed, quiet_tail_s=3)
        assert not any(seg.on and seg.end_s > 12 + 1e-9 for seg in s.segments)


def test_bursts_are_denser_than_lulls() -> None:
    """With burst 4 the on-periods hold about 4 times the arrivals per second of the off-periods;
    burst 1 is plain Poisson (peak rate = mean rate)."""
    s = arrivals.bursty_schedule(20, 200, seed=2, burst=4)
    on = [seg for seg in s.segments if seg.on]
    off = [seg for seg in s.segments if not seg.on]

    def density(segs: list[arrivals.Segment]) -> float:
        n = sum(1 for t in s.times for g in segs if g.start_s <= t < g.end_s)
        seconds: float = sum(g.length_s for g in segs)
        return n / seconds

    assert density(on) / density(off) == pytest.approx(4, rel=0.25)
    assert s.peak_rate > s.mean_rate
    flat = arrivals.bursty_schedule(20, 50, seed=2, burst=1)
    assert flat.peak_rate == pytest.approx(flat.mean_rate)


def test_max_in_window() -> None:
    s = arrivals.Schedule([0.0, 0.1, 0.2, 1.5, 1.6], [], 2.0, 1.0)
    assert s.max_in(0.5) == 3
    assert s.max_in(2.0) == 5


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        arrivals.bursty_schedule(0, 10, seed=1)
    with pytest.raises(ValueError, match="burst"):
        arrivals.bursty_schedule(1, 10, seed=1, burst=0.5)
    with pytest.raises(ValueError, match="duration"):
        arrivals.bursty_schedule(1, 0, seed=1)


def test_capacity_is_slots_over_service_time() -> None:
    assert report.capacity(2, 0.2) == pytest.approx(10)
    with pytest.raises(ValueError, match="positive"):
        report.capacity(2, 0)


def _o(sched: float, done: float, status: int = 200, backend: str = "fast") -> report.Outcome:
    return report.Outcome(sched, sched, done, status, backend)


def test_summary_counts_latency_from_the_scheduled_arrival() -> None:
    """Latency starts at the scheduled time; throughput runs over window + drain; failures and
    503s are counted apart; the fast share is over completed requests."""
    outcomes = [
        _o(0.0, 1.0),
        _o(1.0, 2.0, backend="slow"),
        _o(2.0, 4.0),
        report.Outcome(3.0, 3.5, 3.6, 503, None),
        report.Outcome(4.0, 4.0, 4.1, 0, None, "ClientOSError"),
    ]
    r = report.summarize(outcomes, offered=6, cut=1, window_s=5.0, ideal_rps=1.0, fast_id="fast")
    assert r["completed"] == 3
    assert r["errors"] == 2
    assert r["rejected_503"] == 1
    assert r["error_kinds"] == {"status 503": 1, "ClientOSError": 1}
    assert r["cut"] == 1
    assert r["wall_s"] == 5.0
    assert r["drain_s"] == 0.0
    assert r["throughput_rps"] == pytest.approx(3 / 5)
    assert r["share_of_ideal"] == pytest.approx(0.6)
    assert r["p50_ms"] == pytest.approx(1000)
    assert r["max_ms"] == pytest.approx(2000)
    assert r["fast_share"] == pytest.approx(2 / 3)
    assert r["send_lag_max_ms"] == pytest.approx(500)


def test_summary_drain_extends_the_wall_time() -> None:
    r = report.summarize(
        [_o(0.0, 8.0)], offered=1, cut=0, window_s=5.0, ideal_rps=2.0, fast_id="fast"
    )
    assert r["drain_s"] == pytest.approx(3.0)
    assert r["throughput_rps"] == pytest.approx(1 / 8)


def test_summary_of_nothing_is_nan_not_an_error() -> None:
    r = report.summarize([], offered=0, cut=0, window_s=5.0, ideal_rps=2.0, fast_id="fast")
    assert r["completed"] == 0
    assert math.isnan(r["p99_ms"])
    assert math.isnan(r["fast_share"])


def _result(strategy: str, queue: bool, share: float, p99: float) -> dict[str, object]:
    return {
        "strategy": strategy,
        "queue": queue,
        "share_of_ideal": share,
        "p99_ms": p99,
        "completed": 10,
        "errors": 0,
        "cut": 0,
    }


def test_verdicts() -> None:
    """Best queued share against 0.90; least_connections+queue's p99 against round robin's
    without the queue, as a ratio that must reach 2."""
    results = {
        report.key(s, q): _result(s, q, share, p99)
        for s, q, share, p99 in [
            ("round_robin", True, 0.93, 2000.0),
            ("round_robin", False, 0.60, 9000.0),
            ("least_connections", True, 0.91, 3000.0),
            ("least_connections", False, 0.97, 4000.0),  # not queued: not a candidate
        ]
    }
    v = report.verdicts(results)
    assert v["best_queued"] == "round_robin+queue"
    assert v["pass_share"] is True
    assert v["p99_gain"] == pytest.approx(3.0)
    assert v["pass_p99"] is True
    results["least_connections+queue"]["p99_ms"] = 5000.0
    assert report.verdicts(results)["pass_p99"] is False
    assert report.p99_gain(results, "round_robin+queue") == pytest.approx(4.5)


def test_verdicts_without_the_needed_configurations_are_na() -> None:
    v = report.verdicts({"score+direct": _result("score", False, 0.5, 100.0)})
    assert v["best_queued"] is None
    assert v["pass_share"] is None
    assert v["pass_p99"] is None
    md = report.markdown({"score+direct": _result("score", False, 0.5, 100.0)}, v)
    assert "n/a" in md
    assert "| score | no |" in md


def test_finite_makes_strict_json() -> None:
    data = {"a": math.nan, "b": [1.0, math.inf], "c": (2, "x")}
    assert json.dumps(_report.finite(data), allow_nan=False) == (
        '{"a": null, "b": [1.0, null], "c": [2, "x"]}'
    )


def test_central_fifo_takes_the_first_free_slot() -> None:
    """Three arrivals at once on a fast (1 s) and a slow (3 s) slot: the fast slot serves the
    first and, being free again at 1 s, the third; the slow slot the second."""
    served = model.central_fifo([0.0, 0.0, 0.0], [1.0, 3.0])
    assert [s.slot for s in served] == [0, 1, 0]
    assert [s.latency_s for s in served] == [1.0, 3.0, 2.0]


def test_central_fifo_handoff_only_delays_waiters() -> None:
    served = model.central_fifo([0.0, 0.5, 5.0], [1.0], handoff_s=0.1)
    assert [round(s.latency_s, 6) for s in served] == [1.0, 1.6, 1.0]
    with pytest.raises(ValueError, match="slot"):
        model.central_fifo([0.0], [])
