"""The affinity benchmark's arithmetic: the seeded workload, cold-load counting, summaries,
verdicts and the table.

Nothing here is timed; the benchmark itself never runs in CI.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter
from typing import Any

import _affinity_report as report
import _affinity_workload as workload
import affinity
import pytest


def _take(seed: int, client: int, n: int, **kw: Any) -> list[workload.Step]:
    return list(itertools.islice(workload.client_steps(seed, client, **kw), n))


def test_client_sequences_are_reproducible_and_differ_by_client() -> None:
    """The same (seed, client) gives the same requests in every configuration; another client
    or another seed gives others."""
    a = _take(1, 0, 50)
    assert a == _take(1, 0, 50)
    assert a != _take(1, 1, 50)
    assert a != _take(2, 0, 50)


def test_mix_think_time_streams_and_tokens_follow_the_settings() -> None:
    """Over many draws the models follow the 50/30/20 mix, think times average the mean,
    about half the requests stream, and token counts stay in their range."""
    steps = _take(3, 7, 20_000, think_mean_s=1.5, stream_share=0.5, tokens=(16, 48))
    share = Counter(s.model for s in steps)
    for model, weight in zip(workload.MODELS, workload.MIX, strict=True):
        assert share[model] / len(steps) == pytest.approx(weight / 100, abs=0.015)
    assert statistics.fmean(s.think_s for s in steps) == pytest.approx(1.5, rel=0.05)
    assert sum(s.stream for s in steps) / len(steps) == pytest.approx(0.5, abs=0.015)
    assert min(s.tokens for s in steps) == 16
    assert max(s.tokens for s in steps) == 48


def test_step_body_is_an_ollama_generate_request() -> None:
    step = workload.Step(0.5, "qwen2.5:7b", True, 20)
    assert step.body() == {
        "model": "qwen2.5:7b",
        "prompt": step.body()["prompt"],
        "stream": True,
        "options": {"num_predict": 20},
    }


def test_parse_mix() -> None:
    assert workload.parse_mix("50,30,20") == (50.0, 30.0, 20.0)
    for bad in ("50,50", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ValueError, match="mix"):
            workload.parse_mix(bad)
    with pytest.raises(ValueError, match="think"):
        next(workload.client_steps(1, 0, think_mean_s=0))


def test_exactly_two_models_fit_a_gpu() -> None:
    """The benchmark's premise: on a 12 GiB GPU any two of the three models fit, all three do
    not (sizes as the simulator lists them)."""
    from corral.sim.config import registry_models

    sizes = [registry_models()[m].size_bytes for m in workload.MODELS]
    vram = 12 * 1024**3
    assert all(a + b <= vram for a, b in itertools.combinations(sizes, 2))
    assert sum(sizes) > vram


def test_load_wait_from_a_body_or_a_stream() -> None:
    """load_duration (ns) from a non-streamed body or a stream's final line; 0 without it."""
    body = json.dumps({"done": True, "load_duration": 2_000_000_000}).encode()
    assert workload.load_wait_s(body) == pytest.approx(2.0)
    stream = b'{"response":"a","done":false}\n{"done":true,"load_duration":500000}\n\n'
    assert workload.load_wait_s(stream) == pytest.approx(0.0005)
    assert workload.load_wait_s(b"") == 0
    assert workload.load_wait_s(b"not json") == 0
    assert workload.load_wait_s(b'{"done":true}') == 0


def test_resident_changes_count_loads_and_unloads() -> None:
    """A model newly listed in /api/ps is a cold load; one no longer listed was unloaded."""
    before = frozenset({"a", "b"})
    assert workload.resident_changes(before, frozenset({"a", "c"})) == ({"c"}, {"b"})
    assert workload.resident_changes(before, before) == (set(), set())
    changes = [
        workload.Change(0.1, "gpu0", "a", True),
        workload.Change(0.2, "gpu1", "a", True),
        workload.Change(3.0, "gpu0", "b", True),
        workload.Change(3.0, "gpu0", "a", False),
    ]
    assert workload.count_changes(changes) == {
        "cold_loads": 3,
        "unloads": 1,
        "loads:gpu0": 2,
        "loads:gpu1": 1,
    }


def _o(model: str, latency: float, *, backend: str = "gpu0", wait: float = 0.0) -> report.Outcome:
    return report.Outcome(0, model, False, 1.0, 1.0 + latency, 200, backend, wait)


def test_summary() -> None:
    """Latency is send to last byte; p95 interpolates; failures are counted apart; a request
    waited for a load when its load_duration reached half a load; models per backend."""
    outcomes = [_o("a", 0.1 * i, wait=1.5 if i == 3 else 0.01) for i in range(1, 21)]
    outcomes += [
        _o("b", 1.0, backend="gpu1"),
        report.Outcome(1, "a", True, 2.0, 2.1, 503, "gpu0"),
        report.Outcome(1, "a", True, 2.0, 2.1, 0, None, error="ClientOSError"),
    ]
    changes = [workload.Change(0.1, "gpu0", "a", True)]
    r = report.summarize(outcomes, changes, wall_s=10.0, load_s=2.0)
    assert r["requests"] == 21
    assert r["errors"] == 2
    assert r["error_kinds"] == {"status 503": 1, "ClientOSError": 1}
    assert r["throughput_rps"] == pytest.approx(2.1)
    assert r["p50_ms"] == pytest.approx(1000)
    assert r["p95_ms"] == pytest.approx(1900)
    assert r["max_ms"] == pytest.approx(2000)
    assert r["cold_loads"] == 1
    assert r["load_waits"] == 1
    assert r["by_model"] == {"a": {"gpu0": 20}, "b": {"gpu1": 1}}
    assert r["by_backend"] == {"gpu0": 20, "gpu1": 1}


def test_summary_of_nothing_is_nan_not_an_error() -> None:
    r = report.summarize([], [], wall_s=5.0, load_s=2.0)
    assert r["requests"] == 0
    assert r["cold_loads"] == 0
    assert math.isnan(r["p95_ms"])
    assert math.isnan(r["max_ms"])


def _results(**loads_p95: tuple[int, float]) -> dict[str, dict[str, object]]:
    return {
        name: {"requests": 100, "errors": 0, "cold_loads": loads, "p95_ms": p95}
        for name, (loads, p95) in loads_p95.items()
    }


def test_verdicts_against_round_robin() -> None:
    """Affinity on passes with at least 5 times fewer cold loads than round robin and a lower
    p95."""
    results = _results(round_robin=(40, 6000.0), affinity_off=(30, 5000.0), affinity_on=(8, 3000.0))
    v = report.verdicts(results)
    assert v["cold_load_ratio"] == pytest.approx(5.0)
    assert v["pass_cold_loads"] is True
    assert v["p95_ratio"] == pytest.approx(2.0)
    assert v["pass_p95"] is True
    assert report.ratio(results, "cold_loads", "affinity_off") == pytest.approx(40 / 30)
    results["affinity_on"].update(cold_loads=9, p95_ms=6500.0)
    v = report.verdicts(results)
    assert v["pass_cold_loads"] is False
    assert v["pass_p95"] is False


def test_verdicts_edge_cases() -> None:
    """No cold load at all is infinitely fewer; a missing configuration is n/a, not a miss."""
    v = report.verdicts(_results(round_robin=(10, 100.0), affinity_on=(0, 50.0)))
    assert v["cold_load_ratio"] == math.inf
    assert v["pass_cold_loads"] is True
    v = report.verdicts(_results(affinity_off=(10, 100.0)))
    assert v["pass_cold_loads"] is None
    assert v["pass_p95"] is None


def test_markdown_table_and_verdicts() -> None:
    results = _results(round_robin=(40, 6000.0), affinity_on=(4, 3000.0))
    md = report.markdown(results, report.verdicts(results), ["a note"])
    assert "| round robin, GPU-blind | round_robin | off | 100 | 0 |" in md
    assert "| affinity on | least_connections | on |" in md
    assert "| 10.0× | 2.00× |" in md
    assert "- cold loads, round robin ÷ affinity on: 10.0× (goal ≥ 5×): PASS" in md
    assert "- p95, round robin ÷ affinity on: 2.00× (goal > 1×, a lower p95): PASS" in md
    assert md.endswith("- a note")


def test_arguments() -> None:
    """--quick shortens every configuration; unknown configurations and bad mixes are refused."""
    args = affinity.parse_args(["--quick", "--configs", "round_robin,affinity_on"])
    assert args.duration == 4.0
    assert args.config_list == ["round_robin", "affinity_on"]
    assert args.mix_weights == (50.0, 30.0, 20.0)
    with pytest.raises(SystemExit):
        affinity.parse_args(["--configs", "random"])
    with pytest.raises(SystemExit):
        affinity.parse_args(["--mix", "1,2"])
