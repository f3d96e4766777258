"""Admission over real backends: slots, priorities, overload, stalls, dynamic backends."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.sim.config import SimModel
from tests.helpers import CorralThread, make_settings, metric, poll

pytestmark = pytest.mark.integration
LB = "/api/v1/loadbalancer"
GEN = {"model": "llama3.2", "prompt": "x", "stream": False}


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """Most requests a backend ran at the same time, from its (start, end) records."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    peak = cur = 0
    for _, step in events:
        cur += step
        peak = max(peak, cur)
    return peak


def spans_of(sim: Any) -> list[tuple[float, float]]:
    return [
        (r["started"], r["ended"])
        for r in sim.stats()["recent"]
        if r["route"] == "/api/generate" and r["ended"] is not None
    ]


def test_twenty_requests_on_two_by_two_slots(sim_factory: Any, corral_factory: Any) -> None:
    """2 backends x 2 slots, 20 concurrent requests: all complete, never >2 at once per backend."""
    a = sim_factory(name="a", token_interval_s=0.01, tokens=5, num_parallel=8)
    b = sim_factory(name="b", token_interval_s=0.01, tokens=5, num_parallel=8)
    corral = corral_factory(
        [
            {"id": "a", "url": a.url, "max_concurrent": 2},
            {"id": "b", "url": b.url, "max_concurrent": 2},
        ]
    )
    codes: list[int] = []

    def one() -> None:
        with corral.client() as client:
            codes.append(client.post("/api/generate", json=GEN).status_code)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert codes == [200] * 20
    sa, sb = spans_of(a), spans_of(b)
    assert len(sa) + len(sb) == 20
    # The simulator timestamps are its own; allow it the same instant for end and next start.
    assert peak_overlap(sa) <= 2
    assert peak_overlap(sb) <= 2


def test_urgent_overtakes_queued_normal(sim_factory: Any, corral_factory: Any) -> None:
    """With the only slot busy, a later urgent request is served before earlier normal ones."""
    sim = sim_factory(name="a", token_interval_s=0.05, tokens=60)
    corral = corral_factory([{"id": "a", "url": sim.url, "max_concurrent": 1}])
    done: list[str] = []

    def one(name: str, priority: str) -> None:
        # The first request holds the slot for 3 s; the queued ones are one token each.
        body = GEN if name == "first" else {**GEN, "options": {"num_predict": 1}}
        headers = {"X-Priority": priority, "X-Request-ID": name}
        with corral.client() as client:
            r = client.post("/api/generate", json=body, headers=headers)
            assert r.status_code == 200
            done.append(name)

    def queued() -> int:
        return int(corral.call(lambda: corral.runtime.admission.queued))

    first = threading.Thread(target=one, args=("first", "normal"))
    first.start()
    assert poll(lambda: corral.call(lambda: corral.runtime.registry.get("a").in_flight) == 1, 5)
    threads = []
    for name, prio in [("n1", "normal"), ("n2", "normal"), ("u", "urgent")]:
        t = threading.Thread(target=one, args=(name, prio))
        t.start()
        threads.append(t)
        assert poll(lambda: queued() == len(threads), 5)
    for t in [first, *threads]:
        t.join(20)
    assert sorted(done) == ["first", "n1", "n2", "u"]
    served = sorted(sim.stats()["recent"], key=lambda r: r["started"])
    assert [r["request_id"] for r in served if r["route"] == "/api/generate"] == [
        "first",
        "u",
        "n1",
        "n2",
    ]
    with corral.client() as client:
        r = client.post("/api/generate", json=GEN, headers={"X-Priority": "asap"})
        assert r.status_code == 400
        assert "X-Priority" in r.json()["error"]


def test_queued_client_that_leaves_frees_its_place(sim_factory: Any, corral_factory: Any) -> None:
    """A client gone while queued is dropped from the queue at once; nothing reaches a backend."""
    sim = sim_factory(name="a", token_interval_s=0.1, tokens=10)
    corral = corral_factory([{"id": "a", "url": sim.url, "max_concurrent": 1}])

    def hold() -> None:
        with corral.client() as client:
            client.post("/api/generate", json=GEN)

    holder = threading.Thread(target=hold)
    holder.start()
    assert poll(lambda: corral.call(lambda: corral.runtime.registry.get("a").in_flight) == 1, 5)
    with corral.client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/api/generate", json=GEN)
    assert poll(lambda: corral.call(lambda: corral.runtime.admission.queued) == 0, 1)
    holder.join(10)
    assert sim.stats()["by_route"]["/api/generate"] == 1


def test_overload_every_request_is_answered(sim_factory: Any, corral_factory: Any) -> None:
    """3x more requests than slots + queue: each completes or gets 503 + Retry-After; none hang."""
    sim = sim_factory(name="a", token_interval_s=0.02, tokens=10)
    corral = corral_factory(
        [{"id": "a", "url": sim.url, "max_concurrent": 2}],
        queue={"max_size": 4, "timeout_s": 5},
    )
    n = 3 * (2 + 4)
    outcomes: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        with corral.client(timeout=20) as client:
            r = client.post("/api/generate", json=GEN)
        if r.status_code == 200:
            kind = "ok"
        elif r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]:
            kind = "503"
        else:
            kind = f"bad {r.status_code}"
        with lock:
            outcomes.append(kind)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == n, "every request got an answer"
    assert set(outcomes) <= {"ok", "503"}, outcomes
    assert outcomes.count("ok") >= 6
    assert outcomes.count("503") >= 1
    with corral.client() as client:
        assert metric(client, 'corral_rejections_total{reason="queue_full"}') >= 1


def test_stalled_stream_is_cut_and_its_slot_freed(sim_factory: Any, corral_factory: Any) -> None:
    """A backend silent for longer than timeouts.idle_s mid-stream: final error line, slot back."""
    sim = sim_factory(name="a", token_interval_s=1.0, tokens=5)
    corral = corral_factory(
        [{"id": "a", "url": sim.url, "max_concurrent": 1}], timeouts={"idle_s": 0.3}
    )
    started = time.monotonic()
    with (
        corral.client() as client,
        client.stream("POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}) as resp,
    ):
        lines = [json.loads(x) for x in resp.iter_lines()]
    assert time.monotonic() - started < 3
    assert "error" in lines[-1]
    assert "stalled" in lines[-1]["error"]
    assert corral.call(lambda: corral.runtime.registry.get("a").in_flight) == 0
    assert corral.call(lambda: corral.runtime.registry.get("a").total_failures) == 1


def test_dynamic_backend_leaves_rotation_then_goes(sim_factory: Any, corral_factory: Any) -> None:
    """Without heartbeats a ttl_s backend takes no new work, then is removed."""
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory([{"id": "a", "url": a.url}])
    with corral.client() as c:
        assert (
            c.post(f"{LB}/backends", json={"id": "dyn", "url": b.url, "ttl_s": 0.5}).status_code
            == 201
        )
        assert poll(lambda: "dyn" not in c.get(f"{LB}/loads").json()["loads"], 3)
        for _ in range(4):
            r = c.post("/api/embed", json={"model": "all-minilm", "input": "x"})
            assert r.headers["x-corral-backend"] == "a"


def test_registrations_survive_a_restart(tmp_path: Path, sim_factory: Any) -> None:
    """Backends added through the admin API come back after corral restarts (state file)."""
    a, b = sim_factory(name="a"), sim_factory(name="b")
    state = tmp_path / "state.json"

    def start() -> CorralThread:
        settings = make_settings([{"id": "gpu0", "url": a.url}], server={"state_file": str(state)})
        return CorralThread(settings).__enter__()

    first = start()
    try:
        with first.client() as c:
            r = c.post(f"{LB}/backends", json={"id": "extra", "url": b.url, "max_concurrent": 3})
            assert r.status_code == 201
            r = c.post(f"{LB}/backends", json={"id": "dyn", "url": b.url, "ttl_s": 60})
            assert r.status_code == 201
    finally:
        first.__exit__(None, None, None)
    assert json.loads(state.read_text())["backends"][0]["id"] == "extra"
    second = start()
    try:
        with second.client() as c:
            loads = c.get(f"{LB}/loads").json()["loads"]
            assert set(loads) == {"gpu0", "extra", "dyn"}
            assert loads["extra"]["max_concurrent"] == 3
            assert loads["extra"]["healthy"] is True
            assert c.delete(f"{LB}/backends/extra").status_code == 200
    finally:
        second.__exit__(None, None, None)
    assert [x["id"] for x in json.loads(state.read_text())["backends"]] == ["dyn"]


def test_delete_waits_for_in_flight_or_forces(sim_factory: Any, corral_factory: Any) -> None:
    """DELETE drains and returns once the running stream ended; ?force=true removes at once."""
    a = sim_factory(name="a", token_interval_s=0.05, tokens=12)
    corral = corral_factory([{"id": "a", "url": a.url}])
    lines: list[Any] = []

    def stream() -> None:
        with (
            corral.client() as client,
            client.stream(
                "POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}
            ) as resp,
        ):
            lines.extend(json.loads(x) for x in resp.iter_lines())

    t = threading.Thread(target=stream)
    t.start()
    assert poll(lambda: corral.call(lambda: corral.runtime.registry.get("a").in_flight) == 1, 5)
    with corral.client() as c:
        r = c.delete(f"{LB}/backends/a")
        assert r.status_code == 200
        # DELETE answered only once the backend had finished the stream.
        gen = [x for x in a.stats()["recent"] if x["route"] == "/api/generate"]
        assert len(gen) == 1
        assert gen[0]["ended"] is not None
        assert gen[0]["cancelled"] is False
        t.join(10)
        assert lines[-1]["done"] is True
        assert c.post(f"{LB}/backends", json={"id": "a", "url": a.url}).status_code == 201
        t2 = threading.Thread(target=stream)
        t2.start()
        assert poll(lambda: corral.call(lambda: corral.runtime.registry.get("a").in_flight) == 1, 5)
        r = c.delete(f"{LB}/backends/a", params={"force": "true"})
        assert r.status_code == 200
        assert r.json()["in_flight"] == 1
    t.join(10)
    t2.join(10)


def test_time_queued_in_corral_does_not_count_against_the_backend(
    sim_factory: Any, corral_factory: Any
) -> None:
    """One slot, four requests at once: three wait in corral's queue, yet the backend's average
    and last response times and its TTFT estimate stay those of one request (~0.2 s)."""
    sim = sim_factory(name="a", ttft_s=0.1, token_interval_s=0.025, tokens=4)
    corral = corral_factory([{"id": "a", "url": sim.url, "max_concurrent": 1}])
    threads = [
        threading.Thread(target=lambda: httpx.post(f"{corral.url}/api/generate", json=GEN))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    with corral.client() as client:
        entry = client.get(f"{LB}/loads").json()["loads"]["a"]
        assert entry["total_connections"] == 4
        assert metric(client, "corral_queue_wait_seconds_sum") > 0.3  # they did queue
    assert entry["last_response_time"] < 0.35
    assert entry["avg_response_time"] < 0.35
    assert entry["ttft_ewma_s"] < 0.25


def slot_taken_and_one_queued(corral: Any) -> list[threading.Thread]:
    """Two requests for GEN's model against one slot: one served (slowly), one queued."""

    def hold() -> None:
        with corral.client() as client:
            client.post("/api/generate", json=GEN)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for holder in holders:
        holder.start()
    assert poll(lambda: corral.call(lambda: corral.runtime.admission.queued) == 1, 5)
    return holders


def test_unknown_model_is_404_at_once_while_others_queue(
    sim_factory: Any, corral_factory: Any
) -> None:
    """With the only slot taken and a request waiting in the queue, a model no backend has is
    answered Ollama's 404 (OpenAI's on /v1) at once, not after the queue's timeout."""
    sim = sim_factory(name="a", token_interval_s=0.1, tokens=20)
    corral = corral_factory(
        [{"id": "a", "url": sim.url, "max_concurrent": 1}], queue={"timeout_s": 30}
    )

    holders = slot_taken_and_one_queued(corral)
    with corral.client(timeout=5) as client:  # far below the queue's 30 s
        native = client.post("/api/generate", json={"model": "no-such-model", "prompt": "x"})
        assert native.status_code == 404
        assert native.json() == {"error": "model 'no-such-model' not found"}
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
        openai = client.post("/v1/chat/completions", json=body)
        assert openai.status_code == 404
        assert openai.json()["error"]["type"] == "not_found_error"
    for holder in holders:
        holder.join(10)


def test_a_cloud_model_passes_through_without_a_gpu_slot(
    sim_factory: Any, corral_factory: Any
) -> None:
    """A `-cloud` model runs on Ollama's cloud through a backend that lists it: with that
    backend's only GPU slot taken and a local request queued for it, the cloud request is
    still served at once, and counted under its name."""
    llama = SimModel("llama3.2:latest", 2019393189)
    cloud = SimModel("gpt-oss:20b-cloud", 384)
    sim = sim_factory(name="a", token_interval_s=0.1, tokens=20, models=[llama, cloud])
    corral = corral_factory(
        [{"id": "a", "url": sim.url, "max_concurrent": 1, "max_loaded_models": 1}],
        queue={"timeout_s": 30},
    )

    holders = slot_taken_and_one_queued(corral)
    with corral.client(timeout=5) as client:  # the local requests take 2 s each
        body = {"model": "gpt-oss:20b-cloud", "prompt": "x", "stream": False, "options": {}}
        resp = client.post("/api/generate", json={**body, "options": {"num_predict": 2}})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-corral-backend"] == "a"
        assert corral.call(lambda: corral.runtime.admission.queued) == 1  # still waiting
        label = 'corral_requests_total{backend="a",code="200",model="gpt-oss:20b-cloud"'
        assert metric(client, label + ',route="generate"}') == 1
    for holder in holders:
        holder.join(10)
