"""corral in front of simulated backends: routes, shapes, errors, headers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(sim_factory: Any, corral_factory: Any) -> Any:
    a = sim_factory(name="a")
    b = sim_factory(name="b")
    corral = corral_factory(
        [{"id": "gpu0", "url": a.url}, {"id": "gpu1", "url": b.url}],
        # The plain strategy: with model affinity a cold model would stay where it loaded first.
        balancer={"strategy": "round_robin", "model_affinity": False},
    )
    return corral, a, b


def test_generate_stream_passes_through_with_headers(fleet: Any) -> None:
    """A streamed generate arrives as Ollama's NDJSON, with X-Corral-Backend and X-Request-ID."""
    corral, _, _ = fleet
    with (
        corral.client() as client,
        client.stream(
            "POST",
            "/api/generate",
            json={"model": "llama3.2", "prompt": "hi"},
            headers={"X-Request-ID": "req-123"},
        ) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-ndjson"
        assert resp.headers["x-corral-backend"] in {"gpu0", "gpu1"}
        assert resp.headers["x-request-id"] == "req-123"
        lines = [json.loads(line) for line in resp.iter_lines()]
    assert lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == len(lines) - 1
    assert all(not line["done"] for line in lines[:-1])


def test_backend_sees_rewritten_host_and_request_id(fleet: Any) -> None:
    """The backend gets Host = its own address (Ollama's loopback check) and the request id."""
    corral, a, b = fleet
    with corral.client() as client:
        for _ in range(2):
            r = client.post(
                "/api/generate",
                json={"model": "llama3.2", "prompt": "x", "stream": False},
                headers={"Host": "localhost", "X-Request-ID": "abc"},
            )
            assert r.status_code == 200
    for sim in (a, b):
        recent = sim.stats()["recent"]
        gen = [r for r in recent if r["route"] == "/api/generate"]
        assert gen, "each backend served one request (round robin)"
        assert gen[-1]["host"] == f"127.0.0.1:{sim.port}"
        assert gen[-1]["request_id"] == "abc"


def test_round_robin_spreads_evenly(fleet: Any) -> None:
    """Round robin alternates between the two backends."""
    corral, _, _ = fleet
    seen = []
    with corral.client() as client:
        for _ in range(10):
            r = client.post("/api/embed", json={"model": "all-minilm", "input": "x"})
            assert r.status_code == 200
            seen.append(r.headers["x-corral-backend"])
    assert seen.count("gpu0") == seen.count("gpu1") == 5


def test_aggregated_tags_ps_models_version(fleet: Any) -> None:
    """tags and /v1/models merge (deduplicated); ps tags each entry with its backend."""
    corral, _, _ = fleet
    with corral.client() as client:
        tags_resp = client.get("/api/tags")
        assert sorted(tags_resp.headers["x-corral-backend"].split(",")) == ["gpu0", "gpu1"]
        tags = tags_resp.json()["models"]
        names = [m["name"] for m in tags]
        assert len(names) == len(set(names))
        assert "llama3.2:latest" in names
        for _ in range(2):
            client.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
        ps = client.get("/api/ps").json()["models"]
        assert sorted(m["backend"] for m in ps if m["name"] == "llama3.2:latest") == [
            "gpu0",
            "gpu1",
        ]
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        assert {m["id"] for m in models["data"]} == set(names)
        assert client.get("/api/version").json()["version"]
        root = client.get("/")
        assert root.text == "Ollama is running"
        assert client.head("/").status_code == 200
        one = client.get("/v1/models/llama3.2:latest")
        assert one.status_code == 200
        assert one.json()["id"] == "llama3.2:latest"


def test_errors_keep_ollamas_shapes(fleet: Any) -> None:
    """Bad JSON, missing model, unknown model, unknown route, wrong method, oversized body."""
    corral, _, _ = fleet
    with corral.client() as client:
        r = client.post("/api/generate", content=b"{not json")
        assert r.status_code == 400
        assert "error" in r.json()
        r = client.post("/api/generate", content=b"")
        assert (r.status_code, r.json()) == (400, {"error": "missing request body"})
        r = client.post("/api/generate", json={"prompt": "x"})
        assert (r.status_code, r.json()) == (404, {"error": "model '' not found"})
        r = client.post("/api/chat", json={"messages": []})
        assert (r.status_code, r.json()) == (400, {"error": "model is required"})
        r = client.post("/api/generate", json={"model": "nope", "prompt": "x"})
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
        r = client.get("/api/nothing")
        assert (r.status_code, r.text) == (404, "404 page not found")
        r = client.get("/api/generate")
        assert (r.status_code, r.text) == (405, "405 method not allowed")
        r = client.post("/api/generate", content=b"[1, 2]")
        assert r.status_code == 400
        r = client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["type"] == "not_found_error"
        assert "nope" in err["message"]
        r = client.post("/api/pull", content=b"{not json")
        assert r.status_code == 400
        assert set(r.json()) == {"error"}


def test_oversized_body_is_413(sim_factory: Any, corral_factory: Any) -> None:
    """A body over server.max_body_mb gets 413 in Ollama's shape; nothing reaches a backend."""
    sim = sim_factory(name="a")
    corral = corral_factory([{"id": "a", "url": sim.url}], server={"max_body_mb": 0.01})
    big = json.dumps({"model": "llama3.2", "prompt": "x" * 20_000})
    with corral.client() as client:
        r = client.post("/api/generate", content=big)
        assert r.status_code == 413
        assert "too large" in r.json()["error"]
        r = client.post(
            "/api/generate", json={"model": "llama3.2", "prompt": "ok", "stream": False}
        )
        assert r.status_code == 200
    assert sim.stats()["by_route"].get("/api/generate") == 1


def test_no_backend_is_503_with_retry_after(corral_factory: Any) -> None:
    """With every backend down, inference gets 503 + Retry-After (whole seconds ≥ 1)."""
    corral = corral_factory([{"id": "dead", "url": f"http://127.0.0.1:{free_port()}"}])
    with corral.client() as client:
        r = client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert "error" in r.json()
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200


def test_metrics_exposes_the_product_names(fleet: Any) -> None:
    """/metrics has requests, durations, ttft, tokens, in-flight, up, strategy."""
    corral, _, _ = fleet
    with corral.client() as client:
        client.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
        text = client.get("/metrics").text
    for name in (
        "corral_requests_total{",
        "corral_request_duration_seconds_bucket{",
        "corral_time_to_first_token_seconds_bucket{",
        "corral_tokens_generated_total{",
        "corral_backend_in_flight{",
        'corral_backend_up{backend="gpu0"} 1.0',
        'corral_strategy_info{strategy="round_robin"} 1.0',
    ):
        assert name in text, name
    line = next(x for x in text.splitlines() if x.startswith("corral_tokens_generated_total{"))
    assert float(line.rsplit(" ", 1)[1]) == 16.0


def _decode(resp: httpx.Response) -> dict[str, Any]:
    data: dict[str, Any] = resp.json()
    return data


def test_zstd_bodies_on_v1_routes(fleet: Any) -> None:
    """A /v1 body sent with Content-Encoding: zstd is read (its model routed, a model no
    backend has is a 404) and reaches the backend as sent; a corrupt one is a 400 and one that
    decodes past server.max_body_mb a 413, both in OpenAI's shape."""
    import zstandard

    corral, _, _ = fleet
    zstd = {"content-type": "application/json", "content-encoding": "zstd"}

    def packed(model: str) -> bytes:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return zstandard.ZstdCompressor().compress(json.dumps(body).encode())

    with corral.client() as client:
        ok = client.post("/v1/chat/completions", content=packed("llama3.2"), headers=zstd)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"]
        missing = client.post("/v1/chat/completions", content=packed("nope"), headers=zstd)
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"
        broken = client.post("/v1/chat/completions", content=b"not zstd at all", headers=zstd)
        assert broken.status_code == 400
        assert broken.json()["error"]["message"].startswith("invalid zstd body")
        bomb = zstandard.ZstdCompressor().compress(b" " * (21 * 1024 * 1024))
        assert len(bomb) < 10_000
        big = client.post("/v1/chat/completions", content=bomb, headers=zstd)
        assert big.status_code == 413
        assert "too large" in big.json()["error"]["message"]


def test_a_local_suffix_is_the_local_model(fleet: Any) -> None:
    """`name:tag:local` is routed as the local `name:tag` (Ollama strips the suffix); a model
    with a tag that happens to be "local" is just that model."""
    corral, _, _ = fleet
    with corral.client() as client:
        body = {"model": "llama3.2:latest:local", "prompt": "hi", "stream": False}
        resp = client.post("/api/generate", json=body)
        assert resp.status_code == 200, resp.text
        # forwarded byte for byte: the simulator echoes the name as it got it
        assert resp.json()["model"] == "llama3.2:latest:local"
        other = client.post("/api/generate", json={**body, "model": "llama3.2:local"})
        assert other.status_code == 404
        assert other.json() == {"error": "model 'llama3.2:local' not found"}


def test_account_routes_go_to_the_account_backend(sim_factory: Any, corral_factory: Any) -> None:
    """With `[account] backend = "gpu1"` the account routes reach gpu1 only (loopback needs no
    admin key when none is set); when it is down they answer 503, not another account."""
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory(
        [{"id": "gpu0", "url": a.url}, {"id": "gpu1", "url": b.url}],
        account={"backend": "gpu1"},
    )
    with corral.client() as client:
        for _ in range(3):
            me = client.post("/api/me")
            assert (me.status_code, me.headers["x-corral-backend"]) == (200, "gpu1")
        corral.call(lambda: setattr(corral.runtime.registry.get("gpu1"), "healthy", False))
        down = client.post("/api/me")
        assert down.status_code == 503
        assert down.json() == {"error": "the account backend 'gpu1' is down"}
    assert "/api/me" not in a.stats()["by_route"]


def test_audio_uploads_have_their_own_limit(fleet: Any) -> None:
    """A transcription upload may exceed server.max_body_mb (20 MB) up to OpenAI's 25 MB; past
    that, or without a model field, corral answers in OpenAI's shape itself."""
    corral, _, _ = fleet
    url = "/v1/audio/transcriptions"
    with corral.client() as client:
        big = client.post(url, data={"model": "llama3.2"}, files={"file": b"\0" * 21_000_000})
        assert big.status_code == 200, big.text[:300]
        too_big = client.post(url, data={"model": "x"}, files={"file": b"\0" * 27_000_000})
        assert too_big.status_code == 413
        assert "this route's own" in too_big.json()["error"]["message"]
        nameless = client.post(url, files={"file": b"\0" * 10})
        assert nameless.status_code == 400
        assert nameless.json()["error"]["message"] == "model is required"


def test_a_huge_model_name_is_neither_echoed_nor_logged_whole(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 2 MB model name: the 404 names a cut version of it and the log line stays small."""
    corral, _, _ = fleet
    name = "x" * 2_000_000
    with corral.client() as client:
        for path in ("/api/chat", "/v1/chat/completions"):
            r = client.post(path, json={"model": name, "messages": []})
            assert r.status_code == 404
            assert len(r.content) < 1000
            assert "xxxx…" in json.dumps(r.json(), ensure_ascii=False)
        pulled = client.post("/api/pull", json={"model": name, "stream": False})
        assert len(pulled.content) < 10_000
    out = capsys.readouterr().out
    assert name[:5000] not in out
    assert len(out) < 50_000
