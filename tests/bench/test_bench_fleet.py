"""The fleet benchmark's workload and arithmetic: seeded chats that resend their history, the
offered load, percentiles and shares; and one quick end-to-end run through corral.

Nothing here is timed; the benchmark itself never runs in CI.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import _fleet_report as report
import _fleet_workload as workload
import fleet
import pytest

BENCH = Path(fleet.__file__).resolve().parent


def test_workload_is_the_same_for_a_seed_and_differs_between_seeds() -> None:
    """Two builds with one seed are identical; another seed gives other chats."""
    a, b = workload.build(1, 0.6), workload.build(1, 0.6)
    assert a == b
    assert workload.build(2, 0.6).conversations != a.conversations
    assert 90 <= len(a.conversations) <= 110


def test_workload_shape() -> None:
    """1-6 turns, starts inside the window in order, shared system prompts and documents in
    roughly the planned shares, the most popular model first."""
    convs = [c for seed in (1, 2, 3) for c in workload.build(seed, 0.6).conversations]
    assert all(1 <= len(c.turns) <= 6 for c in convs)
    with_system = sum(c.system is not None for c in convs) / len(convs)
    with_document = sum(c.document for c in convs) / len(convs)
    assert 0.7 < with_system < 0.9
    assert 0.15 < with_document < 0.35
    counts = {m.name: sum(c.model == m.name for c in convs) for m in workload.MODELS}
    assert max(counts, key=counts.__getitem__) == workload.MODELS[0].name
    wl = workload.build(1, 0.6)
    starts = [c.start_s for c in wl.conversations]
    assert starts == sorted(starts)
    assert starts[0] >= 0
    assert starts[-1] < wl.window_s
    assert all(t.think_s == 0 for c in convs for t in c.turns[:1])


def test_every_turn_resends_the_history_with_the_answers_as_received() -> None:
    """Turn k sends the system prompt, every earlier user turn and answer, then its own."""
    conv = next(c for c in workload.build(3, 0.6).conversations if len(c.turns) >= 3)
    answers = ["first answer as streamed", "second  answer, spacing kept"]
    body = conv.body(2, answers)
    msgs = body["messages"]
    assert isinstance(msgs, list)
    offset = 1 if conv.system is not None else 0
    if offset:
        assert msgs[0] == {"role": "system", "content": workload.SYSTEM_PROMPTS[conv.system]}
    assert [m["role"] for m in msgs[offset:]] == ["user", "assistant"] * 2 + ["user"]
    assert msgs[offset + 1]["content"] == answers[0]
    assert msgs[offset + 3]["content"] == answers[1]
    assert msgs[-1]["content"] == conv.turns[2].user
    assert body["stream"] is True
    assert body["options"] == {"num_predict": conv.turns[2].num_predict}
    # The earlier turn's request is a prefix of this one: what a prompt cache can reuse.
    assert conv.messages(1, answers[:1]) == msgs[: offset + 3]
    with pytest.raises(ValueError, match="earlier answers"):
        conv.messages(2, answers[:1])


def test_offered_load_matches_the_load_asked_for() -> None:
    """Requests over the arrival window, divided by the nominal capacity, is --load."""
    for load in (0.6, 0.8):
        wl = workload.build(2, load)
        assert wl.offered_load == pytest.approx(load)
        sizes = workload.request_sizes(wl.conversations)
        assert len(sizes) == wl.requests
        assert wl.capacity_rps == pytest.approx(workload.capacity_rps(sizes))
    # Twice the load: the same chats in half the window.
    assert workload.build(1, 0.3).window_s == pytest.approx(2 * workload.build(1, 0.6).window_s)


def test_capacity_is_slots_over_the_mean_service_time() -> None:
    """One GPU prefilling 1000 tokens/s and decoding a token per 10 ms: a request of 1000
    prompt tokens and 100 tokens out takes 2 s, so 4 slots serve 2 requests/s."""
    gpu = workload.Gpu("x", 24, 10.0, 1000, 1.0, 600)
    assert workload.service_s(gpu, 1000, 100) == pytest.approx(2.0)
    assert workload.capacity_rps([(1000, 100)], [gpu]) == pytest.approx(workload.SLOTS / 2)
    assert workload.capacity_rps([(1000, 100)], [gpu, gpu]) == pytest.approx(workload.SLOTS)


def test_starts_follow_calm_and_burst_phases() -> None:
    """The burst phases (a third of the time, 3x the rate) get 3/5 of the starts."""
    import random

    starts = workload.phase_starts(random.Random(5), 6000, 300.0, 20.0, 10.0, 3.0)
    assert len(starts) == 6000
    assert starts == sorted(starts)
    in_burst = sum(1 for t in starts if t % 30.0 >= 20.0) / len(starts)
    assert in_burst == pytest.approx(0.6, abs=0.03)
    assert workload.zipf_weights(3) == pytest.approx([6 / 11, 3 / 11, 2 / 11])


def _outcome(turn: int, ttft: float | None, status: int = 200) -> report.Outcome:
    first = None if ttft is None else 1.0 + ttft
    return report.Outcome(0, turn, "chat:9b", 1.0, first, 2.0, status)


def test_summary_percentiles_shares_and_counters() -> None:
    """TTFT in real seconds (wall x scale), the share within target over completed turns,
    follow-ups apart, the simulators' counters summed, and busy shares of the wall time."""
    outcomes = [_outcome(0, 0.1), _outcome(1, 0.2), _outcome(2, 0.3), _outcome(1, None, 503)]
    sched = {
        "loads": 3,
        "reloads": 1,
        "evictions": 2,
        "prompt_tokens": 1000,
        "prompt_tokens_cached": 250,
        "busy_s": 5.0,
        "load_s": 1.0,
    }
    stats = {
        "h100": {"scheduler": sched, "by_route": {"/api/chat": 3, "/api/ps": 40}},
        "a10": {"scheduler": {**sched, "busy_s": 2.5}, "by_route": {"/api/chat": 1}},
    }
    r = report.summarize(
        outcomes, planned=5, stats=stats, ps_counts={}, wall_s=10.0, time_scale=4, target_s=1.0
    )
    assert (r["sent"], r["completed"], r["errors"]) == (4, 3, 1)
    assert r["ttft_p50_s"] == pytest.approx(0.8)
    assert r["ttft_p95_s"] == pytest.approx(1.16)
    assert r["within_target"] == pytest.approx(2 / 3)
    assert r["followup_ttft_p50_s"] == pytest.approx(1.0)
    assert (r["cold_loads"], r["evictions"]) == (8, 4)
    assert r["cache_share"] == pytest.approx(0.25)
    assert r["busy_share"] == {"h100": 0.5, "a10": 0.25}
    assert r["request_share"] == {"h100": 0.75, "a10": 0.25}
    md = report.markdown({"corral": r})
    assert "| corral | 3 / 4 * | 0.80 | 1.16 | 67% | 1.00 | 8 | 4 | 25% | 50 / 25 | 75 / 25 |" in md


def test_summary_without_scheduler_counters_uses_ps_samples() -> None:
    """Older simulators: cold loads from /api/ps samples, no cache share, no busy share."""
    stats = {"h100": {"by_route": {"/api/chat": 1}}}
    r = report.summarize(
        [_outcome(0, 0.1)],
        planned=1,
        stats=stats,
        ps_counts={"cold_loads": 2, "unloads": 1},
        wall_s=1.0,
        time_scale=1,
        target_s=1.0,
    )
    assert r["counters"] == "api/ps samples"
    assert (r["cold_loads"], r["unloads"], r["busy_share"]) == (2, 1, None)
    assert math.isnan(r["cache_share"])
    assert report.within([], 1.0) != report.within([], 1.0)  # NaN for no values


def test_arguments() -> None:
    """--quick shortens the run; lists parse; unknown contenders are refused."""
    a = fleet.parse_args(["--quick", "--seeds", "1,2", "--load", "0.6,0.8"])
    assert a.conversation_range == (10, 12)
    assert a.time_scale == 8
    assert (a.seed_list, a.load_list) == ([1, 2], [0.6, 0.8])
    assert fleet.parse_args([]).contender_list == ["corral", "herd", "nginx"]
    with pytest.raises(SystemExit):
        fleet.parse_args(["--contenders", "corral,haproxy"])


@pytest.mark.integration
def test_quick_run_through_corral(tmp_path: Path) -> None:
    """--quick --contenders corral runs end to end and answers every turn it sent."""
    out = tmp_path / "fleet.json"
    argv = [sys.executable, str(BENCH / "fleet.py"), "--quick", "--contenders", "corral"]
    argv += ["--conversations", "4,4", "--time-scale", "16", "--max-tail", "8"]
    argv += ["--json", str(out)]
    done = subprocess.run(argv, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    corral = run["results"]["corral"]
    assert corral["sent"] > 0
    assert corral["completed"] == corral["sent"]
