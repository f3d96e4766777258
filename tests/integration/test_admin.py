"""The admin API: auth, strategy, loads, backends, stats; bad input is a clear 4xx."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.helpers import poll

pytestmark = pytest.mark.integration
LB = "/api/v1/loadbalancer"


@pytest.fixture
def corral(sim_factory: Any, corral_factory: Any) -> Any:
    a = sim_factory(name="a")
    return corral_factory([{"id": "gpu0", "url": a.url, "gpu": 0}])


def test_strategy_get_put_and_bad_input(corral: Any) -> None:
    """GET/PUT strategy; unknown name → 400 listing known ones; malformed body → 422."""
    with corral.client() as c:
        assert c.get(f"{LB}/strategy").json() == {"strategy": "least_connections"}
        r = c.put(f"{LB}/strategy", json={"strategy": "round_robin"})
        assert r.status_code == 200
        assert r.json()["strategy"] == "round_robin"
        assert "round_robin" in r.json()["message"]
        assert c.get(f"{LB}/strategy").json() == {"strategy": "round_robin"}
        r = c.put(f"{LB}/strategy", json={"strategy": "fastest"})
        assert r.status_code == 400
        assert "least_connections" in r.json()["detail"]
        r = c.put(f"{LB}/strategy", content=b"{bad")
        assert r.status_code == 422
        r = c.put(f"{LB}/strategy", json={"name": "x"})
        assert r.status_code == 422
        assert 'corral_strategy_info{strategy="round_robin"} 1.0' in c.get("/metrics").text


def test_loads_and_single_load(corral: Any) -> None:
    """loads has the seed-compatible fields; load?instance_id=ID one entry; unknown → 404."""
    with corral.client() as c:
        c.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
        data = c.get(f"{LB}/loads").json()
        assert data["count"] == 1
        entry = data["loads"]["gpu0"]
        for key in (
            "instance_id",
            "active_connections",
            "total_connections",
            "avg_response_time",
            "last_response_time",
            "weight",
            "last_used",
            "healthy",
            "gpu",
        ):
            assert key in entry
        assert entry["total_connections"] == 1
        assert entry["gpu"] == 0
        assert (
            c.get(f"{LB}/load", params={"instance_id": "gpu0"}).json()
            == c.get(f"{LB}/loads").json()["loads"]["gpu0"]
        )
        assert c.get(f"{LB}/load", params={"instance_id": "nope"}).status_code == 404
        assert c.get(f"{LB}/load").status_code == 422


def test_backends_add_drain_remove(corral: Any, sim_factory: Any) -> None:
    """Register a backend at runtime, drain it, enable it, remove it; bad input is 4xx."""
    b = sim_factory(name="b")
    with corral.client() as c:
        r = c.post(f"{LB}/backends", json={"id": "gpu1", "url": b.url})
        assert r.status_code == 201
        assert r.json()["healthy"] is True
        assert c.post(f"{LB}/backends", json={"id": "gpu1", "url": b.url}).status_code == 409
        assert c.post(f"{LB}/backends", json={"id": "x", "url": "ftp://nope"}).status_code == 422
        assert c.post(f"{LB}/backends", json={"id": "bad id!", "url": b.url}).status_code == 422
        ids = [x["instance_id"] for x in c.get(f"{LB}/backends").json()["backends"]]
        assert ids == ["gpu0", "gpu1"]
        assert c.patch(f"{LB}/backends/gpu1", json={"action": "drain"}).json()["draining"]
        for _ in range(4):
            r = c.post("/api/embed", json={"model": "all-minilm", "input": "x"})
            assert r.headers["x-corral-backend"] == "gpu0"
        assert not c.patch(f"{LB}/backends/gpu1", json={"action": "enable"}).json()["draining"]
        assert c.patch(f"{LB}/backends/gpu1", json={}).status_code == 400
        assert c.patch(f"{LB}/backends/gpu1", json={"action": "explode"}).status_code == 422
        assert c.patch(f"{LB}/backends/nope", json={"action": "drain"}).status_code == 404
        assert c.delete(f"{LB}/backends/gpu1").status_code == 200
        assert c.delete(f"{LB}/backends/gpu1").status_code == 404
        stats = c.get(f"{LB}/stats").json()
        assert stats["backends"] == 1
        assert stats["healthy"] == 1
        assert stats["total_capacity"] == 4
        for key in ("current_load", "utilization", "queued", "retried"):
            assert key in stats


def test_dynamic_backend_expires_without_heartbeat(corral: Any, sim_factory: Any) -> None:
    """A backend registered with ttl_s disappears unless it sends heartbeats."""
    b = sim_factory(name="b")
    with corral.client() as c:
        r = c.post(f"{LB}/backends", json={"id": "dyn", "url": b.url, "ttl_s": 0.6})
        assert r.status_code == 201
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.9:
            assert c.post(f"{LB}/backends/dyn/heartbeat", json={"ttl_s": 0.6}).status_code == 200
            time.sleep(0.1)
        assert "dyn" in c.get(f"{LB}/loads").json()["loads"]
        assert poll(lambda: "dyn" not in c.get(f"{LB}/loads").json()["loads"], 3)
        assert c.post(f"{LB}/backends/gpu0/heartbeat").status_code == 400


def test_admin_key_required_when_set(
    sim_factory: Any, corral_factory: Any, monkeypatch: Any
) -> None:
    """With CORRAL_ADMIN_KEY set: no/wrong key → 401 without detail; X-API-Key or Bearer work."""
    monkeypatch.setenv("CORRAL_ADMIN_KEY", "s3cret")
    a = sim_factory(name="a")
    corral = corral_factory([{"id": "a", "url": a.url}])
    with corral.client() as c:
        r = c.get(f"{LB}/loads")
        assert r.status_code == 401
        assert r.json() == {"detail": "unauthorized"}
        assert c.get(f"{LB}/loads", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get(f"{LB}/loads", headers={"X-API-Key": "s3cret"}).status_code == 200
        ok = c.get(f"{LB}/strategy", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        # Ollama routes and probes need no admin key.
        assert c.get("/api/tags").status_code == 200
        assert c.get("/healthz").status_code == 200
