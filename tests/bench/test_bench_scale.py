"""The scale and soak benchmarks' arithmetic: timestamps and line delays, the hold window, the
loop probe, goals and verdicts, routing fleets, /proc sampling, the soak's schedule, verdicts,
windows, RSS growth and plot.

Nothing here is timed; the benchmarks themselves never run in CI.
"""

from __future__ import annotations

import calendar
import math
import os
from collections import Counter
from pathlib import Path

import _sampler as sampler
import _scale_client as client
import _scale_report as report
import _scale_routing as routing
import _soak_load as load
import _soak_report as soak_report
import pytest
import scale
import soak

from corral.strategies import strategy_names

# --- the stream client -----------------------------------------------------------------------


def test_created_at_parses_go_rfc3339_with_nanoseconds() -> None:
    """The simulator's created_at (trailing zeros dropped, or no fraction) in Unix ns."""
    base = calendar.timegm((2025, 3, 4, 5, 6, 7, 0, 0, 0)) * 1_000_000_000
    line = b'{"model":"m","created_at":"2025-03-04T05:06:07.123456789Z","response":"a"}'
    assert client.created_ns(line) == base + 123_456_789
    assert client.created_ns(b'{"created_at":"2025-03-04T05:06:07.5Z"}') == base + 500_000_000
    assert client.created_ns(b'{"created_at":"2025-03-04T05:06:07Z"}') == base
    assert client.created_ns(b'{"done":true}') is None
    assert client.created_ns(b'{"created_at":"not a time"}') is None


def test_lines_split_across_chunks() -> None:
    """A line arrives whole only once its newline has; the rest waits for the next chunk."""
    lines, rest = client.split_lines(b"", b'{"a":1}\n{"b"')
    assert lines == [b'{"a":1}']
    assert rest == b'{"b"'
    lines, rest = client.split_lines(rest, b":2}\n\n")
    assert lines == [b'{"b":2}']
    assert rest == b""


def test_stream_summary() -> None:
    """Every stream was open from the last first byte to the first end; errors are counted."""
    streams = []
    for sent, first, ended, error in ((0.0, 1.0, 9.0, ""), (0.1, 2.0, 8.0, ""), (0.2, 0, 3, "x")):
        s = client.Stream()
        s.sent, s.first, s.ended, s.error = sent, first, ended, error
        s.complete = not error
        streams.append(s)
    summary = client.summarize_streams(streams)
    assert summary["streams"] == 3
    assert summary["answered"] == 2
    assert summary["complete"] == 2
    assert summary["errors"] == 1
    assert summary["last_first_s"] == 2.0
    assert summary["first_end_s"] == 3.0
    assert summary["ttfb_s"] == pytest.approx([1.0, 1.9])


# --- the scale report ------------------------------------------------------------------------


def test_hold_window_pairs_and_spread() -> None:
    """The window starts after every client's last first byte, ends at the first end; only
    lines arriving inside it count."""
    clients = [
        {"last_first_s": 3.0, "first_end_s": 20.0},
        {"last_first_s": 4.0, "first_end_s": 19.0},
    ]
    assert report.hold_window(clients, 0.5) == (4.5, 19.0)
    pairs = [1.0, 100.0, 5.0, 1.0, 10.0, 2.0, 19.5, 50.0]
    assert report.pairs_in(pairs, 4.5, 19.0) == [1.0, 2.0]
    s = report.spread([1.0, 2.0, 3.0])
    assert s["count"] == 3
    assert s["p50_ms"] == 2.0
    assert s["max_ms"] == 3.0
    assert math.isnan(report.spread([])["p99_ms"])


def test_probe_summary_counts_failures_apart() -> None:
    probes = [(0.5, 0.001), (1.0, 0.002), (1.5, None), (2.0, 0.004), (9.0, 1.0)]
    p = report.probes_in(probes, 1.0, 2.0)
    assert p["count"] == 2
    assert p["failed"] == 1
    assert p["p50_ms"] == pytest.approx(3.0)


def test_cpu_per_request_net_of_the_idle_background() -> None:
    raw, net = report.per_request(cpu_s=1.0, idle_share=0.05, window_s=4.0, requests=1000)
    assert raw == pytest.approx(1000.0)
    assert net == pytest.approx(800.0)
    assert all(math.isnan(v) for v in report.per_request(1.0, 0.0, 1.0, 0))


def _phase(**kw: float) -> dict[str, object]:
    p: dict[str, object] = {
        "streams": 1000,
        "complete": 1000,
        "errors": 0,
        "held": 1000,
        "window_s": 20.0,
        "ttfb": report.spread([1.0]),
        "lines_per_s": 10_000.0,
        "delay": report.spread([1.0]),
        "probe": report.spread([2.0]),
        "rss_peak_mb": 120.0,
        "cpu_share": 0.4,
        "cpu_us_per_chunk": 40.0,
        "client_cpu_share": 0.2,
        "machine_busy": 0.5,
        "cpu_pressure": 0.1,
    }
    p.update(kw)
    return p


def _routing_rows(slow_us: float) -> list[dict[str, object]]:
    return [
        {
            "backends": n,
            "shape": "a third hold the model",
            "strategy": s,
            "acquire": {"p50_us": slow_us if (n == 100 and s == "score") else 10.0},
        }
        for n in (2, 100)
        for s in ("round_robin", "score")
    ]


def test_goals_pass_and_miss() -> None:
    """Each goal is judged against its target; the slowest strategy stands for routing."""
    result = {
        "streams": 1000,
        "backends": 100,
        "phases": {"corral": _phase()},
        "routing_worst": report.routing_verdict(_routing_rows(30.0), 100),
    }
    assert result["routing_worst"] == {
        "a third hold the model": {"strategy": "score", "p50_us": 30}
    }
    assert [ok for *_, ok in report.goals(result)] == [True, True, True, True, True]
    result["phases"] = {"corral": _phase(rss_peak_mb=350.0, held=990)}
    result["phases"]["corral"]["probe"] = report.spread([12.0])
    result["routing_worst"] = report.routing_verdict(_routing_rows(60.0), 100)
    assert [ok for *_, ok in report.goals(result)] == [False, False, False, True, False]
    md = report.goals_markdown(result)
    assert "| < 300 MB | 350 MB | MISS |" in md
    assert "acquire+release p50 (score) | < 50 µs | 60.0 µs | MISS |" in md


def test_phase_table_shows_the_added_latency() -> None:
    direct = _phase(delay=report.spread([1.0, 2.0]))
    corral = _phase(delay=report.spread([1.5, 3.5]))
    md = report.phases_markdown({"direct": direct, "corral": corral})
    assert md.count("\n| direct |") == 1
    assert "per-chunk latency added by corral: p50 +1.00 ms" in md


def test_routing_and_e2e_tables() -> None:
    rows = _routing_rows(30.0)
    for r in rows:
        r["acquire"]["p99_us"] = 99.0  # type: ignore[index]
    md = report.routing_markdown(rows)
    assert "| score | 10.0 / 99.0 | 30.0 / 99.0 |" in md
    row = {"idle_cpu_share": 0.01, "rps": 200.0, "p50_ms": 2.0, "p99_ms": 8.0, "errors": 0}
    e2e = {"2": {**row, "cpu_us_per_request": 900.0, "net_us_per_request": 850.0}}
    assert "| 2 | 1.0% | 200 | 2.00 | 8.00 | 0 | 900 | 850 |" in report.e2e_markdown(e2e)


# --- routing in-process ----------------------------------------------------------------------


def test_fleet_shapes() -> None:
    """Every backend has a free slot and the models; every k-th holds the requested one."""
    third = routing.fleet(9, 3)
    assert sum(routing.KEY in b.resident for b in third) == 3
    assert all(routing.KEY in b.resident for b in routing.fleet(4, 1))
    assert all(b.healthy and b.in_flight < b.max_concurrent for b in third)
    assert len({b.id for b in routing.fleet(100)}) == 100


def test_measure_times_pick_and_acquire_and_leaves_slots_as_found() -> None:
    r = routing.measure(5, "all hold the model", "least_connections", 20)
    assert r["pick"]["calls"] == 20
    assert r["acquire"]["calls"] == 20
    assert r["acquire"]["p50_us"] > 0
    rows = routing.run(3, 10)
    assert len(rows) == 3 * len(strategy_names())


# --- /proc sampling --------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_sampler_reads_this_process() -> None:
    s = sampler.Sampler(os.getpid(), 1.0).sample()
    assert s.rss_bytes > 1_000_000
    assert s.cpu_s > 0
    assert sampler.rss_bytes(2**22 + 12345) == 0  # no such process


def test_shares_over_samples() -> None:
    samples = [
        sampler.Sample(0.0, 100 * sampler.MB, 1.0, 100, 1000, 1_000_000),
        sampler.Sample(1.0, 150 * sampler.MB, 1.5, 200, 1200, 1_250_000),
        sampler.Sample(2.0, 120 * sampler.MB, 2.0, 300, 1400, 1_500_000),
    ]
    assert sampler.cpu_share(samples) == pytest.approx(0.5)
    assert sampler.machine_busy(samples) == pytest.approx(0.5)
    assert sampler.cpu_pressure(samples) == pytest.approx(0.25)
    assert sampler.peak_rss(samples) == 150 * sampler.MB
    assert sampler.between(samples, 0.5, 2.0) == samples[1:]
    assert math.isnan(sampler.cpu_share(samples[:1]))


# --- the soak's load -------------------------------------------------------------------------


def test_schedule_is_seeded_poisson_and_mixed() -> None:
    a = load.schedule(1, 30.0, 200.0, (4, 32))
    assert a == load.schedule(1, 30.0, 200.0, (4, 32))
    assert a != load.schedule(2, 30.0, 200.0, (4, 32))
    assert len(a) / 200 == pytest.approx(30, rel=0.1)
    kinds = Counter(r.kind.name for r in a)
    assert set(kinds) == {k.name for k in load.KINDS}
    assert min(r.tokens for r in a) >= 4
    assert max(r.tokens for r in a) <= 32
    with pytest.raises(ValueError, match="positive"):
        load.schedule(1, 0, 10, (1, 2))


def test_bodies_in_each_api_shape() -> None:
    by_name = {k.name: k for k in load.KINDS}
    assert by_name["v1 chat"].body("m", 5) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "max_tokens": 5,
    }
    assert by_name["generate stream"].body("m", 5)["options"] == {"num_predict": 5}
    assert "messages" in by_name["chat stream"].body("m", 5)


K = {k.name: k for k in load.KINDS}


@pytest.mark.parametrize(
    ("kind", "status", "body", "verdict"),
    [
        ("generate", 200, b'{"response":"hi","done":true}', "complete"),
        ("generate", 200, b'{"response":"hi","done":false}', "unanswered"),
        ("generate", 200, b'{"response":"h', "unanswered"),
        ("generate", 503, b'{"error":"all backends are busy"}', "error"),
        ("generate", 502, b"Bad Gateway", "unanswered"),
        ("generate", 200, b"", "unanswered"),
        ("generate stream", 200, b'{"response":"a","done":false}\n{"done":true}\n', "complete"),
        ("generate stream", 200, b'{"response":"a","done":false}\n{"error":"cut"}\n', "error"),
        ("generate stream", 200, b'{"response":"a","done":false}\n', "unanswered"),
        ("generate stream", 200, b'{"response":"a","done":false}\n{"resp', "unanswered"),
        ("v1 chat", 200, b'{"choices":[{"finish_reason":"stop"}]}', "complete"),
        ("v1 chat", 200, b'{"choices":[]}', "unanswered"),
        ("v1 chat", 500, b'{"error":{"message":"boom"}}', "error"),
        ("v1 chat", 500, b'{"error":"boom"}', "unanswered"),
        ("v1 chat stream", 200, b'data: {"x":1}\n\ndata: [DONE]\n\n', "complete"),
        ("v1 chat stream", 200, b'data: {"x":1}\n\ndata: {"error":{"message":"m"}}\n\n', "error"),
        ("v1 chat stream", 200, b'data: {"x":1}\n\n', "unanswered"),
        ("v1 chat stream", 200, b'data: {"x":1}\n\ndata: {"x"', "unanswered"),
    ],
)
def test_verdicts(kind: str, status: int, body: bytes, verdict: str) -> None:
    """Complete, a clear error in the route's own shape, or unanswered."""
    assert load.judge(K[kind], status, body)[0] == verdict


# --- the soak's report -----------------------------------------------------------------------


def _o(done: float, verdict: str = "complete", latency: float = 0.5) -> load.Outcome:
    return load.Outcome("generate", "m", done - latency, done, verdict, verdict)


def test_windows_rates_and_latency() -> None:
    outcomes = [_o(1.0), _o(2.0, latency=1.5), _o(3.0, "error"), _o(6.0), _o(11.0, "unanswered")]
    w = soak_report.windows(outcomes, 12.0)
    assert [x["start_s"] for x in w] == [0.0, 5.0, 10.0]
    assert w[0]["complete_rps"] == pytest.approx(0.4)
    assert w[0]["error_rps"] == pytest.approx(0.2)
    assert w[0]["p50_ms"] == pytest.approx(1000.0)
    assert w[2]["unanswered"] == 1
    assert math.isnan(w[2]["p50_ms"])


def test_rss_growth_compares_medians_after_warmup_and_at_the_end() -> None:
    samples = [sampler.Sample(float(t), (100 + t // 10) * sampler.MB, 0.0) for t in range(121)]
    g = soak_report.rss_growth(samples, warmup_s=60, end_s=120)
    assert g["rss_warm_mb"] == pytest.approx(106)
    assert g["rss_end_mb"] == pytest.approx(111)  # five samples of 111, one of 112
    assert g["rss_growth"] == pytest.approx(111 / 106 - 1)
    assert g["rss_peak_mb"] == pytest.approx(112)


def test_summary_verdicts_and_table() -> None:
    outcomes = [_o(float(i)) for i in range(1, 9)] + [_o(9.0, "error")]
    summary = soak_report.summarize(outcomes, skipped=2, duration_s=10.0)
    assert summary["requests"] == 9
    assert summary["complete"] == 8
    assert summary["throughput_rps"] == pytest.approx(0.8)
    memory = {"rss_warm_mb": 100.0, "rss_end_mb": 105.0, "rss_peak_mb": 110.0, "rss_growth": 0.05}
    assert soak_report.verdicts(summary, memory) == {"pass_rss": True, "pass_answered": True}
    md = soak_report.markdown(summary, memory, [soak_report.Fault("kill", "sim0", 1.0, 2.0)])
    assert "| < 10% | +5.0% | PASS |" in md
    assert "| 0 | 0 of 9 | PASS |" in md
    assert "- 1 × error" in md
    summary["unanswered"] = 1
    memory["rss_growth"] = 0.2
    assert soak_report.verdicts(summary, memory) == {"pass_rss": False, "pass_answered": False}


def test_plot_writes_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    outcomes = [_o(t / 2) for t in range(1, 40)]
    samples = [sampler.Sample(float(t), 80 * sampler.MB, 0.0) for t in range(20)]
    faults = [soak_report.Fault("hang", "sim1", 5.0, 8.0)]
    paths = [(tmp_path / "big.png", (6.0, 5.0), 40), (tmp_path / "small" / "s.png", (4.0, 3.0), 30)]
    soak_report.plot(soak_report.windows(outcomes, 20.0), samples, faults, "t", paths)
    for path, _, _ in paths:
        assert path.read_bytes().startswith(b"\x89PNG")


# --- arguments -------------------------------------------------------------------------------


def test_arguments() -> None:
    """--quick shortens both; nonsense is refused; streams fit the simulators' slots and last
    the ramp plus the hold."""
    a = scale.parse_args(["--quick"])
    assert a.streams == 200
    assert a.slots * a.sims >= a.streams
    assert a.tokens * a.token_ms / 1000 >= a.ramp_s + a.hold_s
    with pytest.raises(SystemExit):
        scale.parse_args(["--streams", "0"])
    s = soak.parse_args(["--quick"])
    assert s.duration_s == 60
    assert s.fault_every_s == 10
    assert soak.parse_args([]).duration_s == 600
    with pytest.raises(SystemExit):
        soak.parse_args(["--fault-s", "40"])
    with pytest.raises(SystemExit):
        soak.parse_args(["--bound-s", "5"])
