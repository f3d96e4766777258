"""The overhead benchmark's arithmetic: percentiles, rounds' medians, wrk reports, verdicts.

Nothing here is timed; the benchmark itself never runs in CI.
"""

from __future__ import annotations

import json
import math

import _fast_backend
import _report
import _stats
import _wrk
import pytest


def test_percentile_interpolates_between_ranks() -> None:
    """p50 of an even-sized sample is the mean of the middle two, as numpy computes it."""
    assert _stats.percentile([4, 1, 3, 2], 50) == 2.5
    assert _stats.percentile([1, 2, 3, 4, 5], 50) == 3
    assert _stats.percentile(list(range(101)), 99) == 99
    assert _stats.percentile([10, 20], 75) == 17.5


def test_percentile_edges() -> None:
    """The 0th and 100th percentiles are the extremes; an empty sample gives NaN."""
    assert _stats.percentile([3, 1, 2], 0) == 1
    assert _stats.percentile([3, 1, 2], 100) == 3
    assert _stats.percentile([7], 99) == 7
    assert math.isnan(_stats.percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        _stats.percentile([1], 101)


def test_summarize_latencies_reports_milliseconds() -> None:
    """Latencies go in as seconds and come out as milliseconds."""
    summary = _stats.summarize_latencies([0.001, 0.002, 0.003])
    assert summary["count"] == 3
    assert summary["p50_ms"] == pytest.approx(2.0)
    assert summary["mean_ms"] == pytest.approx(2.0)
    assert summary["p99_ms"] == pytest.approx(2.98)
    assert math.isnan(_stats.summarize_latencies([])["p50_ms"])


def test_rate_and_median_of_rounds() -> None:
    """Rates divide by the window; medians skip rounds that measured nothing."""
    assert _stats.rate(500, 5.0) == 100
    assert _stats.rate(5, 0) == 0
    assert _stats.median_of([3.0, math.nan, 1.0, 2.0]) == 2.0
    assert math.isnan(_stats.median_of([math.nan]))


def test_wrk_report_becomes_a_result_row() -> None:
    """wrk's microseconds become milliseconds and its error kinds are summed."""
    row = _wrk.summarize(
        {
            "requests": 10_000,
            "duration_us": 5_000_000,
            "connect": 0,
            "read": 1,
            "write": 0,
            "status": 2,
            "timeout": 0,
            "p50_us": 1500,
            "p99_us": 9000,
            "max_us": 20000,
        }
    )
    assert row["rps"] == 2000
    assert row["p50_ms"] == 1.5
    assert row["p99_ms"] == 9.0
    assert row["errors"] == 3


def test_wrk_script_spreads_threads_and_paces() -> None:
    """Direct runs name every simulator in setup(); paced runs define delay()."""
    text = _wrk.script_text('{"a":1}', 64, [("127.0.0.1", 9001), ("127.0.0.1", 9002)])
    assert '{"127.0.0.1", "9001"}, {"127.0.0.1", "9002"}' in text
    assert "math.random(0, 128)" in text
    assert "delay" not in _wrk.script_text("{}", 0, [])
    assert _wrk.host_port("http://127.0.0.1:8080") == ("127.0.0.1", 8080)


def _phases(rps: float, p50: float, chunks: float) -> dict[str, dict[str, float]]:
    stream = {"chunks_per_s": chunks, "ttfb_p50_ms": 1.0, "answer_p50_ms": chunks / 40}
    return {
        "saturated": {"rps": rps, "p50_ms": p50},
        "paced": {"p50_ms": p50 / 4},
        "unloaded": {"p50_ms": p50 / 10},
        "stream_chat": dict(stream),
        "stream_v1": dict(stream),
    }


def test_medians_over_rounds_and_summed_errors() -> None:
    """Each metric is the median of its rounds; errors add up over the rounds."""
    rounds = {
        "saturated": [
            {"rps": 100.0, "errors": 1, "mode": "generate"},
            {"rps": 300.0, "errors": 0, "mode": "generate"},
            {"rps": 200.0, "errors": 2, "mode": "generate"},
        ]
    }
    med = _report.medians(rounds)
    assert med["saturated"]["rps"] == 200
    assert med["saturated"]["errors"] == 3


def test_verdicts_compare_with_direct_and_nginx() -> None:
    """Throughput is judged against nginx, latency and chunks/s against direct."""
    med = {
        "direct": _phases(10_000, 2.0, 6400),
        "nginx": _phases(8_000, 2.5, 6390),
        "corral": _phases(2_000, 8.0, 6300),
    }
    v = _report.verdicts(med)["corral"]
    assert v["rps_vs_nginx"] == pytest.approx(0.25)
    assert v["pass_rps"] is True
    assert v["added_p50_saturated_ms"] == pytest.approx(6.0)
    assert v["pass_p50_saturated"] is False
    assert v["added_p50_paced_ms"] == pytest.approx(1.5)
    assert v["pass_p50_paced"] is False
    assert v["added_p50_unloaded_ms"] == pytest.approx(0.6)
    assert v["pass_p50_unloaded"] is True
    for phase in ("stream_chat", "stream_v1"):
        s = v["streams"][phase]
        assert s["chunks_vs_direct"] == pytest.approx(6300 / 6400)
        assert s["pass_chunks"] is True
        assert s["added_answer_p50_ms"] == pytest.approx((6300 - 6400) / 40)
        assert s["added_ttfb_p50_ms"] == 0
    assert "direct" not in _report.verdicts(med)
    assert _report.direct_vs_nginx(med) == pytest.approx(1.25)
    text = _report.markdown(med, _report.verdicts(med))
    assert "| corral | /v1 SSE |" in text
    assert "direct ÷ nginx req/s: 1.25× (≥ 3× shows the backends do not cap nginx): MISS" in text


def test_verdicts_without_nginx_are_not_applicable() -> None:
    """With nginx skipped, the throughput verdict is n/a rather than a miss."""
    med = {"direct": _phases(10_000, 2.0, 6400), "corral": _phases(2_000, 8.0, 6300)}
    v = _report.verdicts(med)["corral"]
    assert v["pass_rps"] is None
    assert _report.mark(v["pass_rps"]) == "n/a"
    assert "| corral |" in _report.markdown(med, {"corral": v})


def test_fast_backend_parses_heads_and_bodies() -> None:
    """Request heads: method, path without query, length, keep-alive; bodies: model, stream
    (Ollama streams by default, the OpenAI API does not); bad input gives None or an error."""
    head = _fast_backend.parse_head(
        b"POST /api/chat?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nConnection: close"
    )
    assert head is not None
    method, path, length, chunked, keep_alive, headers = head
    assert (method, path, length, chunked, keep_alive) == ("POST", "/api/chat", 12, False, False)
    assert headers["host"] == "h"
    http10 = _fast_backend.parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive")
    assert http10 is not None
    assert http10[4] is True
    assert _fast_backend.parse_head(b"garbage") is None
    assert _fast_backend.parse_head(b"GET / HTTP/1.1\r\nContent-Length: x") is None
    assert _fast_backend.parse_body(b'{"model":"m"}', "chat") == ("m", True)
    assert _fast_backend.parse_body(b'{"model":"m"}', "v1") == ("m", False)
    assert _fast_backend.parse_body(b'{"model":"m","stream":false}', "generate") == ("m", False)
    assert isinstance(_fast_backend.parse_body(b"{}", "chat"), bytes)
    assert isinstance(_fast_backend.parse_body(b"[1]", "chat"), bytes)
    assert _fast_backend._dechunk(b"xx3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nNEXT", 2) == (b"abcde", 22)
    assert _fast_backend._dechunk(b"3\r\nab", 0) is None


def test_fast_backend_answers_look_like_ollama() -> None:
    """Health-check lists hold the model fully on the GPU; streams end with Ollama's final
    line or the OpenAI finish chunk and [DONE]; non-streaming answers carry the final fields."""
    args = _fast_backend.parse_args(["--port", "1", "--tokens", "3"])
    clock = _fast_backend.Clock()
    clock.tick()
    a = _fast_backend.Answers(args, clock)
    (tag,) = a.tags()["models"]
    (ps,) = a.ps()["models"]
    assert tag["name"] == "llama3.2:latest"
    assert tag["details"]["family"] == "llama"
    assert ps["size_vram"] == ps["size"] == tag["size"]
    chat = a.chunks("chat", "llama3.2", 3)
    assert len(chat) == 4
    assert all(c.endswith(b"\n") for c in chat)
    final = json.loads(chat[-1])
    assert final["done"] is True
    assert final["eval_count"] == 3
    assert "load_duration" in final
    sse = a.chunks("v1", "llama3.2", 3)
    assert sse[-1] == b"data: [DONE]\n\n"
    assert b'"finish_reason":"stop"' in sse[-2]
    whole = json.loads(a.whole("generate", "llama3.2"))
    assert whole["done"] is True
    assert whole["prompt_eval_count"] > 0
    v1 = json.loads(a.whole("v1", "llama3.2"))
    assert v1["object"] == "chat.completion"
    assert v1["usage"]["completion_tokens"] == 3
