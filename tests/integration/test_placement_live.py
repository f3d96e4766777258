"""Model placement over real loopback simulators: priority models preloaded and moved back to
GPU (evicting the least recently used model), the admin's placement actions and model report."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from corral.sim.config import GIB, SimModel
from tests.helpers import metric, poll

pytestmark = pytest.mark.integration

PLACEMENT = "/api/v1/loadbalancer/models/{}/placement"


def ps(sim: Any) -> dict[str, dict[str, Any]]:
    """The simulator's /api/ps, by model name."""
    with httpx.Client(base_url=sim.url, timeout=10) as direct:
        return {m["name"]: m for m in direct.get("/api/ps").json()["models"]}


def load(sim: Any, model: str, **body: Any) -> None:
    """Load ``model`` on the simulator directly (an empty prompt), bypassing corral."""
    with httpx.Client(base_url=sim.url, timeout=10) as direct:
        resp = direct.post(
            "/api/generate", json={"model": model, "prompt": "", "stream": False, **body}
        )
        assert resp.status_code == 200, resp.text


def run_pass(corral: Any) -> list[Any]:
    """One placement pass, run on corral's own loop."""
    future = asyncio.run_coroutine_threadsafe(corral.runtime.placement.run_pass(), corral.loop)
    return list(future.result(30))


def test_priority_model_on_cpu_is_back_on_gpu_after_one_pass(
    sim_factory: Any, corral_factory: Any
) -> None:
    """The acceptance: a priority model forced onto CPU while two other models fill the GPU is
    back on GPU after one pass; the least recently used of the two (zulu, though the simulator
    itself would have evicted alpha by name) is unloaded to make room, alpha stays."""
    sim = sim_factory(
        name="s0",
        vram_bytes=9 * GIB,  # two 4 GiB models fit, three do not
        models=[SimModel(f"{n}:latest", 4 * GIB) for n in ("prio", "alpha", "zulu")],
    )
    corral = corral_factory(
        [{"id": "gpu0", "url": sim.url, "gpu_metrics_url": f"{sim.url}/_sim/dcgm"}],
        placement={"priority_models": ["prio"], "interval_s": 3600},
    )
    # The pass at start preloads it (the GPU is empty then), forever.
    assert poll(lambda: ps(sim).get("prio:latest", {}).get("size_vram") == 4 * GIB, 10)
    assert ps(sim)["prio:latest"]["expires_at"] > "2300"
    load(sim, "prio", options={"num_gpu": 0})
    load(sim, "zulu")
    load(sim, "alpha")
    before = ps(sim)
    assert before["prio:latest"]["size_vram"] == 0
    assert before["zulu:latest"]["expires_at"] < before["alpha:latest"]["expires_at"]

    changes = run_pass(corral)

    assert [(c.action, c.model, c.backend) for c in changes] == [
        ("evict", "zulu:latest", "gpu0"),
        ("gpu", "prio:latest", "gpu0"),
    ]
    after = ps(sim)
    assert after["prio:latest"]["size_vram"] == after["prio:latest"]["size"] == 4 * GIB
    assert "zulu:latest" not in after
    assert after["alpha:latest"]["size_vram"] == 4 * GIB
    with corral.client() as client:
        for action, count in (("preload", 1), ("evict", 1), ("gpu", 1)):
            series = f'corral_placement_actions_total{{action="{action}",backend="gpu0"}}'
            assert metric(client, series) == count
        entry = client.get("/api/v1/loadbalancer/loads").json()["loads"]["gpu0"]
        assert "prio:latest" in entry["resident"]  # routing saw it at once


def test_priority_model_preloaded_on_start_without_vram_readings(
    sim_factory: Any, corral_factory: Any
) -> None:
    """With no GPU readings corral cannot tell room, so it loads the priority model on one
    backend that has it and lets Ollama place it; keep_alive from the config."""
    a = sim_factory(name="a")
    b = sim_factory(name="b")
    corral = corral_factory(
        [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
        placement={"priority_models": ["qwen2.5:7b"], "keep_alive": "45m"},
    )
    assert poll(lambda: "qwen2.5:7b" in ps(a) or "qwen2.5:7b" in ps(b), 10)
    with corral.client() as client:
        assert poll(lambda: metric(client, "corral_placement_actions_total") == 1, 5)
    held = [s for s in (a, b) if "qwen2.5:7b" in ps(s)]
    assert len(held) == 1
    entry = ps(held[0])["qwen2.5:7b"]
    assert entry["size_vram"] == entry["size"]


def test_admin_placement_actions_show_in_the_backends_ps(
    sim_factory: Any, corral_factory: Any
) -> None:
    """preload, cpu, gpu and unload through the admin API each change the simulator's
    /api/ps, and the answer says where the model runs now on each backend."""
    a = sim_factory(name="a")
    b = sim_factory(name="b")
    corral = corral_factory([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}])
    url = PLACEMENT.format("llama3.2")
    with corral.client() as client:
        resp = client.post(url, json={"action": "preload", "backend": "a"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == "llama3.2"
        assert body["action"] == "preload"
        assert body["results"] == {
            "a": {"ok": True, "resident": "gpu", "size": 2019393189, "size_vram": 2019393189}
        }
        assert "llama3.2:latest" in ps(a)
        assert ps(b) == {}

        resp = client.post(url, json={"action": "cpu"})  # every backend that has it
        assert {k: r["resident"] for k, r in resp.json()["results"].items()} == {
            "a": "cpu",
            "b": "cpu",
        }
        assert ps(a)["llama3.2:latest"]["size_vram"] == 0
        assert ps(b)["llama3.2:latest"]["size_vram"] == 0

        resp = client.post(url, json={"action": "gpu", "backend": "b"})
        assert resp.json()["results"]["b"]["resident"] == "gpu"
        entry = ps(b)["llama3.2:latest"]
        assert entry["size_vram"] == entry["size"]
        assert ps(a)["llama3.2:latest"]["size_vram"] == 0

        resp = client.post(url, json={"action": "unload"})
        assert resp.json()["results"] == {
            "a": {"ok": True, "resident": None, "size": None, "size_vram": None},
            "b": {"ok": True, "resident": None, "size": None, "size_vram": None},
        }
        assert ps(a) == ps(b) == {}

        # An embedding-only model loads through /api/embed.
        resp = client.post(PLACEMENT.format("all-minilm"), json={"action": "preload"})
        assert all(r["resident"] == "gpu" for r in resp.json()["results"].values())
        assert "all-minilm:latest" in ps(a)
        assert metric(client, 'corral_placement_actions_total{action="cpu",backend="a"}') == 1
        assert metric(client, 'corral_placement_actions_total{action="unload",backend="b"}') == 1


def test_models_report_and_placement_errors(sim_factory: Any, corral_factory: Any) -> None:
    """GET /models lists installed and loaded models per backend with where they run (and a
    loaded one's context length); bad
    placement requests get 404 (unknown backend, model not there) or 422 (bad body)."""
    a = sim_factory(name="a")
    b = sim_factory(name="b", models=[SimModel("mistral:latest", 4113301824)])
    load(a, "llama3.2", options={"num_gpu": 10, "num_ctx": 8192})  # 10 of 28 layers on GPU
    corral = corral_factory([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}])
    with corral.client() as client:

        def report() -> dict[str, Any]:
            data = client.get("/api/v1/loadbalancer/models").json()
            return {m["name"]: m["backends"] for m in data["models"]}

        assert poll(lambda: report()["llama3.2:latest"]["a"]["resident"] == "partial", 5)
        models = report()
        assert set(models) == {
            "llama3.2:latest",
            "qwen2.5:7b",
            "all-minilm:latest",
            "mistral:latest",
        }
        llama = models["llama3.2:latest"]["a"]
        assert llama["installed"] is True
        assert 0 < llama["size_vram"] < llama["size"]
        assert llama["context_length"] == 8192  # as /api/ps says its runner was loaded
        assert models["qwen2.5:7b"]["a"]["context_length"] is None  # not loaded
        assert models["qwen2.5:7b"]["a"]["resident"] is None
        assert models["qwen2.5:7b"]["a"]["size"] == 4683087332
        assert set(models["mistral:latest"]) == {"b"}

        resp = client.post(PLACEMENT.format("llama3.2"), json={"action": "gpu", "backend": "x"})
        assert resp.status_code == 404
        assert "unknown backend 'x'" in resp.json()["detail"]
        resp = client.post(PLACEMENT.format("mistral"), json={"action": "preload", "backend": "a"})
        assert resp.status_code == 404
        assert resp.json()["detail"] == "model 'mistral' is not installed on backend 'a'"
        resp = client.post(PLACEMENT.format("nope"), json={"action": "preload"})
        assert resp.status_code == 404
        assert "no healthy backend has model 'nope'" in resp.json()["detail"]
        assert client.post(PLACEMENT.format("mistral"), json={"action": "move"}).status_code == 422
        resp = client.post(PLACEMENT.format("mistral"), json={"action": "gpu", "gpu": 0})
        assert resp.status_code == 422
