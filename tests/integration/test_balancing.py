"""Strategies over real backends, runtime switching, and unbuffered streaming."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from typing import Any

import pytest

from tests.helpers import poll, served_by

pytestmark = pytest.mark.integration

GEN = {"model": "llama3.2", "prompt": "x", "stream": False}


def spread(corral: Any, n: int, body: dict[str, Any] = GEN) -> Counter[str]:
    with corral.client() as client:
        return served_by(client, body, n)


def test_weighted_round_robin_follows_weights(sim_factory: Any, corral_factory: Any) -> None:
    """Weights 3:1 send three requests to the heavy backend for each one to the light one."""
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory(
        [{"id": "big", "url": a.url, "weight": 3}, {"id": "small", "url": b.url, "weight": 1}],
        balancer={"strategy": "weighted_round_robin", "model_affinity": False},
    )
    seen = spread(corral, 40)
    assert seen == {"big": 30, "small": 10}


def test_equal_weighted_evens_out_lifetime_totals(sim_factory: Any, corral_factory: Any) -> None:
    """equal_weighted sends new work to the backend with the fewest lifetime requests."""
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory(
        [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
        balancer={"strategy": "round_robin", "model_affinity": False},
    )
    with corral.client() as client:
        client.patch("/api/v1/loadbalancer/backends/b", json={"action": "drain"})
        assert spread(corral, 6) == {"a": 6}
        client.patch("/api/v1/loadbalancer/backends/b", json={"action": "enable"})
        client.put("/api/v1/loadbalancer/strategy", json={"strategy": "equal_weighted"})
    assert spread(corral, 6) == {"b": 6}


def test_least_connections_avoids_backend_with_long_streams(
    sim_factory: Any, corral_factory: Any
) -> None:
    """Two long streams held on one backend: new requests all go to the other one."""
    a = sim_factory(name="a", token_interval_s=0.05, tokens=400)
    b = sim_factory(name="b", token_interval_s=0.05, tokens=400)
    corral = corral_factory(
        [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
        # Affinity off: this test is about the strategy alone.
        balancer={"strategy": "least_connections", "model_affinity": False},
    )
    stop = threading.Event()
    opened = threading.Semaphore(0)

    def hold() -> None:
        with (
            corral.client() as client,
            client.stream(
                "POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}
            ) as resp,
        ):
            assert resp.headers["x-corral-backend"] == "a"
            opened.release()
            for _ in resp.iter_lines():
                if stop.is_set():
                    break

    with corral.client() as client:
        client.patch("/api/v1/loadbalancer/backends/b", json={"action": "drain"})
        threads = [threading.Thread(target=hold) for _ in range(2)]
        for t in threads:
            t.start()
        for _ in threads:
            assert opened.acquire(timeout=5)
        client.patch("/api/v1/loadbalancer/backends/b", json={"action": "enable"})
    try:
        seen = spread(
            corral,
            10,
            {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 1}},
        )
        assert seen == {"b": 10}
    finally:
        stop.set()
        for t in threads:
            t.join(10)


def test_least_response_time_prefers_the_fast_backend(
    sim_factory: Any, corral_factory: Any
) -> None:
    """Of a fast/slow pair (10 ms vs 600 ms to first token), the fast one gets most requests.
    (The gap is wide: peak-EWMA holds a spike for seconds, and a busy test machine can stall
    the fast one for a fifth of a second.)"""
    fast = sim_factory(name="fast", ttft_s=0.01)
    slow = sim_factory(name="slow", ttft_s=0.6)
    corral = corral_factory(
        [{"id": "fast", "url": fast.url}, {"id": "slow", "url": slow.url}],
        balancer={"strategy": "least_response_time", "model_affinity": False},
    )
    seen = spread(corral, 20)
    assert seen["fast"] >= 17, seen
    assert seen["slow"] >= 1, "the untried backend is tried first"


def test_strategy_switch_keeps_in_flight_streams(sim_factory: Any, corral_factory: Any) -> None:
    """Switching strategy mid-stream neither drops nor disturbs the running streams."""
    a = sim_factory(name="a", token_interval_s=0.02, tokens=30)
    b = sim_factory(name="b", token_interval_s=0.02, tokens=30)
    corral = corral_factory([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}])
    results: list[list[dict[str, Any]]] = []
    started = threading.Semaphore(0)

    def stream() -> None:
        with (
            corral.client() as client,
            client.stream(
                "POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}
            ) as resp,
        ):
            lines = []
            for n, line in enumerate(resp.iter_lines()):
                if n == 0:
                    started.release()
                lines.append(json.loads(line))
            results.append(lines)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=5)
    for name in ("round_robin", "least_response_time", "score", "least_connections"):
        with corral.client() as client:
            r = client.put("/api/v1/loadbalancer/strategy", json={"strategy": name})
            assert r.json()["strategy"] == name
    for t in threads:
        t.join(10)
    assert len(results) == 4
    for lines in results:
        assert lines[-1]["done"] is True
        assert lines[-1]["eval_count"] == 30


def test_streaming_is_unbuffered(sim_factory: Any, corral_factory: Any) -> None:
    """With a token every 200 ms, the first token arrives long before the last is generated."""
    sim = sim_factory(name="a", token_interval_s=0.2, tokens=6)
    corral = corral_factory([{"id": "a", "url": sim.url}])
    arrivals: list[float] = []
    with corral.client() as client:
        start = time.monotonic()
        with client.stream(
            "POST",
            "/api/chat",
            json={
                "model": "llama3.2",
                "messages": [{"role": "user", "content": "hi"}],
            },
        ) as resp:
            for line in resp.iter_lines():
                arrivals.append(time.monotonic() - start)
                assert json.loads(line)["message"]["role"] == "assistant"
    assert len(arrivals) == 7
    # Generation takes ≥ 1 s (6 tokens, 200 ms apart); the first token must not wait for it.
    assert arrivals[0] < 0.5
    assert arrivals[-1] - arrivals[0] >= 0.9
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:-1])]
    assert min(gaps) > 0.1, gaps


def test_queue_waits_when_all_slots_are_full(sim_factory: Any, corral_factory: Any) -> None:
    """max_concurrent=1 and two requests: the second waits for the slot and then succeeds."""
    sim = sim_factory(name="a", token_interval_s=0.05, tokens=6)
    corral = corral_factory([{"id": "a", "url": sim.url, "max_concurrent": 1}])
    codes: list[int] = []

    def one() -> None:
        with corral.client() as client:
            codes.append(client.post("/api/generate", json=GEN).status_code)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    assert poll(lambda: corral.call(lambda: corral.runtime.admission.queued) >= 1, 2)
    for t in threads:
        t.join(10)
    assert codes == [200, 200, 200]
    spans = sorted(
        (r["started"], r["ended"]) for r in sim.stats()["recent"] if r["route"] == "/api/generate"
    )
    assert len(spans) == 3
    # The backend never ran two at once: corral held the others in its queue.
    assert all(prev[1] <= nxt[0] + 0.005 for prev, nxt in itertools.pairwise(spans))
