"""Failures: killed backends, 5xx before the first byte, drops mid-stream, disconnects."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.helpers import metric, poll

pytestmark = pytest.mark.integration


def test_sigkill_under_load_loses_no_request(sim_process_factory: Any, corral_factory: Any) -> None:
    """SIGKILL one backend under steady load: no request fails, it leaves and rejoins rotation."""
    a = sim_process_factory(name="a")
    b = sim_process_factory(name="b")
    interval, fall = 0.2, 2
    corral = corral_factory(
        [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
        # Affinity off: after its restart "a" has no model loaded yet and would be avoided.
        balancer={"strategy": "round_robin", "model_affinity": False},
        health={"interval_s": interval, "fall": fall, "rise": 1, "backoff_max_s": 1},
    )
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        with corral.client(timeout=10) as client:
            while not done.is_set():
                r = client.post(
                    "/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
                )
                count[0] += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        assert poll(lambda: count[0] > 20, 10)
        a.kill()
        killed_at = time.monotonic()
        gone = poll(
            lambda: (
                not corral.call(
                    lambda: corral.runtime.registry.get("a").available(time.monotonic())
                )
            ),
            5,
        )
        left_after = time.monotonic() - killed_at
        assert gone
        # fall x interval plus one probe period of slack (probes are jittered ±10%).
        assert left_after <= fall * interval + interval * 2
        before = count[0]
        assert poll(lambda: count[0] > before + 20, 10)
        a.restart()
        assert poll(
            lambda: corral.call(
                lambda: corral.runtime.registry.get("a").available(time.monotonic())
            ),
            10,
        )
        done.set()  # quiet the load so the round-robin turns below are ours alone
        for w in workers:
            w.join(10)
        with corral.client() as client:
            seen = {
                client.post("/api/embed", json={"model": "all-minilm", "input": "x"}).headers[
                    "x-corral-backend"
                ]
                for _ in range(6)
            }
        assert seen == {"a", "b"}
    finally:
        done.set()
        for w in workers:
            w.join(10)
    assert failures == []


def test_5xx_before_first_byte_fails_over(sim_factory: Any, corral_factory: Any) -> None:
    """A backend answering 500 is retried on another; the client never sees the error."""
    bad = sim_factory(name="bad")
    good = sim_factory(name="good")
    bad.set_faults(error_rate=1.0)
    corral = corral_factory(
        [{"id": "bad", "url": bad.url}, {"id": "good", "url": good.url}],
        # Plain rotation, so half the requests meet the bad backend first.
        balancer={"strategy": "round_robin", "model_affinity": False, "session_affinity": False},
        health={"consecutive_errors": 100, "error_min_requests": 1000},
    )
    with corral.client() as client:
        for _ in range(6):
            r = client.post(
                "/api/chat",
                json={
                    "model": "llama3.2",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": False,
                },
            )
            assert r.status_code == 200
            assert r.headers["x-corral-backend"] == "good"
        assert metric(client, 'corral_retries_total{reason="status_5xx"}') >= 3


def test_busy_503_is_retried_and_not_counted_as_failure(
    sim_factory: Any, corral_factory: Any
) -> None:
    """Ollama's 503 "server busy" moves the request elsewhere without ejecting the backend."""
    busy = sim_factory(name="busy")
    ok = sim_factory(name="ok")
    busy.set_faults(busy=True)
    corral = corral_factory(
        [{"id": "busy", "url": busy.url}, {"id": "ok", "url": ok.url}],
        balancer={"strategy": "round_robin"},
        health={"error_min_requests": 2},
    )
    with corral.client() as client:
        for _ in range(8):
            r = client.post(
                "/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
            )
            assert r.status_code == 200
        assert metric(client, 'corral_retries_total{reason="busy"}') >= 3
    assert corral.call(lambda: corral.runtime.registry.get("busy").available(time.monotonic()))


def test_only_backend_errors_pass_through(sim_factory: Any, corral_factory: Any) -> None:
    """When every attempt fails with 500, the client gets the backend's own error body."""
    bad = sim_factory(name="bad")
    bad.set_faults(error_rate=1.0)
    corral = corral_factory([{"id": "bad", "url": bad.url}])
    with corral.client() as client:
        r = client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
        assert r.status_code == 500
        assert "error" in r.json()
        assert r.headers["x-corral-backend"] == "bad"


def test_drop_mid_stream_ends_with_an_error_line(sim_factory: Any, corral_factory: Any) -> None:
    """A backend dying after the first byte: the stream ends with an error line, not silence."""
    sim = sim_factory(name="a")
    sim.set_faults(drop_after_tokens=3)
    corral = corral_factory([{"id": "a", "url": sim.url}])
    with (
        corral.client() as client,
        client.stream("POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}) as resp,
    ):
        lines = [json.loads(x) for x in resp.iter_lines()]
    assert len(lines) == 4
    assert [bool(x.get("response")) for x in lines[:3]] == [True, True, True]
    assert "error" in lines[-1]
    assert "a" in lines[-1]["error"]


def test_client_disconnect_cancels_upstream(sim_factory: Any, corral_factory: Any) -> None:
    """Closing a stream mid-way cancels the backend's request within 1 s; in-flight returns to 0."""
    sim = sim_factory(name="a", token_interval_s=0.05, tokens=200)
    corral = corral_factory([{"id": "a", "url": sim.url}])
    with corral.client() as client:
        with client.stream(
            "POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}
        ) as resp:
            for n, _ in enumerate(resp.iter_lines()):
                if n == 2:
                    break
        closed_at = time.monotonic()
        assert poll(lambda: sim.stats()["cancelled"] >= 1, 1.0)
        assert time.monotonic() - closed_at <= 1.0
        assert poll(lambda: metric(client, 'corral_backend_in_flight{backend="a"}') == 0, 2)
        assert corral.call(lambda: corral.runtime.registry.get("a").in_flight) == 0


def test_disconnect_while_waiting_for_first_token(sim_factory: Any, corral_factory: Any) -> None:
    """A client that leaves before the first byte (model still loading) frees the backend too."""
    sim = sim_factory(name="a", ttft_s=30)
    corral = corral_factory([{"id": "a", "url": sim.url}])
    with corral.client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
    assert poll(lambda: sim.stats()["cancelled"] >= 1, 1.0)
    assert poll(lambda: corral.call(lambda: corral.runtime.registry.get("a").in_flight) == 0, 1.0)


def test_openai_stream_drop_raises_in_the_client(sim_factory: Any, corral_factory: Any) -> None:
    """On /v1 a backend dying mid-stream becomes an OpenAI error event the openai client raises."""
    import openai

    sim = sim_factory(name="a")
    sim.set_faults(drop_after_tokens=2)
    corral = corral_factory([{"id": "a", "url": sim.url}])
    client = openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused")
    try:
        stream = client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        got: list[str] = []

        def consume() -> None:
            for chunk in stream:
                if chunk.choices:
                    got.append(chunk.choices[0].delta.content or "")

        with pytest.raises(openai.APIError, match="failed mid-stream"):
            consume()
        assert len(got) == 2
    finally:
        client.close()


def test_retry_storm_stays_within_budget(sim_factory: Any, corral_factory: Any) -> None:
    """Every backend failing: backends see about 1.2x the client's requests, not 3x."""
    sims = [sim_factory(name=n) for n in "abc"]
    for sim in sims:
        sim.set_faults(error_rate=1.0)
    corral = corral_factory(
        [{"id": s.config.name, "url": s.url} for s in sims],
        balancer={"max_attempts": 3, "retry_budget_ratio": 0.2, "retry_budget_min": 1},
        # Keep them in rotation: this test is about the retry budget, not ejection.
        health={"error_min_requests": 100000, "consecutive_errors": 100000},
    )
    n = 100  # without the budget, backends would see 300
    with corral.client() as client:
        codes = [
            client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"}).status_code
            for _ in range(n)
        ]
    assert set(codes) == {500}
    seen = sum(s.stats()["by_route"].get("/api/generate", 0) for s in sims)
    # 20% of requests, plus the bucket's initial burst of 10 and ~1/s of floor.
    assert seen <= n * 1.2 + 10 + 15, seen
    assert seen > n


def test_a_request_every_backend_refuses_alike_blames_no_backend(
    sim_factory: Any, corral_factory: Any
) -> None:
    """Ollama answers an invalid `format` with 500. When two backends answer the same request
    with the same 500, the request is at fault: the client gets the error after one retry,
    and no backend is counted as failing, however many such requests come."""
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory(
        [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
        health={"error_min_requests": 2, "error_rate_threshold": 0.5},
    )
    bad = {"model": "llama3.2", "prompt": "x", "stream": False, "format": "yaml"}
    with corral.client() as client:
        for _ in range(6):
            r = client.post("/api/generate", json=bad)
            assert r.status_code == 500
            assert "invalid format" in r.json()["error"]
        loads = client.get("/api/v1/loadbalancer/loads").json()["loads"]
        assert [(e["failures"], e["ejected"]) for e in loads.values()] == [(0, False)] * 2
        assert metric(client, 'corral_retries_total{reason="status_5xx"}') == 6
        good = {"model": "llama3.2", "prompt": "x", "stream": False}
        assert client.post("/api/generate", json=good).status_code == 200


def test_a_backend_failing_alone_is_still_blamed(sim_factory: Any, corral_factory: Any) -> None:
    """A 500 that another backend does not repeat counts against the backend that gave it."""
    bad, good = sim_factory(name="bad"), sim_factory(name="good")
    bad.set_faults(error_rate=1.0)
    corral = corral_factory(
        [{"id": "bad", "url": bad.url}, {"id": "good", "url": good.url}],
        balancer={"strategy": "round_robin", "model_affinity": False, "session_affinity": False},
        health={"error_min_requests": 1000, "consecutive_errors": 100},
    )
    with corral.client() as client:
        for _ in range(4):
            gen = {"model": "llama3.2", "prompt": "x", "stream": False}
            assert client.post("/api/generate", json=gen).status_code == 200
        loads = client.get("/api/v1/loadbalancer/loads").json()["loads"]
        assert loads["bad"]["failures"] == 2
        assert loads["good"]["failures"] == 0
