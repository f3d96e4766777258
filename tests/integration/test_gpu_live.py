"""GPU-aware corral over real loopback simulators: DCGM pages, heat, big models, metrics."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import httpx
import pytest

from corral.fleet.gpu import NvmlSampler
from corral.sim.config import GIB, SimModel, default_models
from tests.fake_nvml import FakeNvml, h100_idle, l4_idle
from tests.helpers import loads, metric, poll, served_by, warm

pytestmark = pytest.mark.integration

BIG = SimModel("mixtral:8x7b", 26_442_481_545, parameter_size="46.7B", block_count=32)


def two_gpus(sim_factory: Any, corral_factory: Any, **gpu: Any) -> tuple[Any, Any, Any]:
    """An 80 GB and a 24 GB simulated GPU, each read from its own DCGM exporter page."""
    models = [*default_models(), BIG]
    big = sim_factory(name="big", vram_bytes=80 * GIB, gpu_name="Sim H100", models=models)
    small = sim_factory(name="small", vram_bytes=24 * GIB, gpu_name="Sim L4", models=list(models))
    for sim in (big, small):
        sim.config.tokens = 4
    corral = corral_factory(
        [
            {"id": "big", "url": big.url, "gpu_metrics_url": f"{big.url}/_sim/dcgm"},
            {"id": "small", "url": small.url, "gpu_metrics_url": f"{small.url}/_sim/dcgm"},
        ],
        gpu={"poll_s": 0.1, **gpu},
        balancer={"strategy": "round_robin"},
    )
    return big, small, corral


def test_gpus_from_exporter_pages_show_in_admin_loads_and_weights(
    sim_factory: Any, corral_factory: Any
) -> None:
    """/gpus lists both simulated GPUs with their backends; loads carry GPU stats and weights."""
    _, _, corral = two_gpus(sim_factory, corral_factory)
    with httpx.Client(base_url=corral.url, timeout=10) as client:
        assert poll(lambda: len(client.get("/api/v1/loadbalancer/gpus").json()["gpus"]) == 2, 5)
        gpus = {g["name"]: g for g in client.get("/api/v1/loadbalancer/gpus").json()["gpus"]}
        assert gpus["Sim H100"]["backends"] == ["big"]
        assert gpus["Sim H100"]["memory_total_bytes"] == 80 * GIB
        assert gpus["Sim L4"]["source"] == "dcgm"
        entries = loads(client)
        assert entries["big"]["gpu_stats"]["name"] == "Sim H100"
        assert entries["small"]["vram_total_bytes"] == 24 * GIB
        assert (entries["big"]["weight"], entries["small"]["weight"]) == (3.0, 1.5)


def test_hot_gpu_is_avoided_until_it_cools(sim_factory: Any, corral_factory: Any) -> None:
    """A simulated GPU at 90 °C gets no requests; back under the hysteresis, it gets them again."""
    big, small, corral = two_gpus(sim_factory, corral_factory, max_temp_c=85, temp_hysteresis_c=5)
    with httpx.Client(base_url=corral.url, timeout=10) as client:
        assert poll(lambda: loads(client)["big"]["gpu_stats"] is not None, 5)
        warm(client, "llama3.2", big, small)
        assert set(served_by(client, {"model": "llama3.2", "prompt": "hi"}, 6)) == {"big", "small"}
        big.config.gpu_temp_c = 90
        assert poll(lambda: loads(client)["big"]["gpu_hot"], 5)
        assert served_by(client, {"model": "llama3.2", "prompt": "hi"}, 8) == Counter(small=8)
        assert metric(client, 'corral_gpu_events_total{backend="big"') == 1
        big.config.gpu_temp_c = 82  # cooler, still inside the hysteresis
        assert poll(lambda: loads(client)["big"]["gpu_stats"]["temperature_c"] == 82, 5)
        assert served_by(client, {"model": "llama3.2", "prompt": "hi"}, 6) == Counter(small=6)
        big.config.gpu_temp_c = None  # back to the load-following temperature (~35 °C)
        assert poll(lambda: not loads(client)["big"]["gpu_hot"], 5)
        assert set(served_by(client, {"model": "llama3.2", "prompt": "hi"}, 6)) == {"big", "small"}


def test_model_too_big_for_the_small_gpu_lands_on_the_big_one(
    sim_factory: Any, corral_factory: Any
) -> None:
    """A 26 GB model goes to the 80 GB GPU only; a small model still spreads over both."""
    big, small, corral = two_gpus(sim_factory, corral_factory)
    with httpx.Client(base_url=corral.url, timeout=10) as client:
        assert poll(lambda: loads(client)["small"]["vram_total_bytes"] is not None, 5)
        warm(client, "llama3.2", big, small)
        assert served_by(client, {"model": "mixtral:8x7b", "prompt": "hi"}, 6) == Counter(big=6)
        assert set(served_by(client, {"model": "llama3.2", "prompt": "hi"}, 6)) == {"big", "small"}


def test_gpu_utilization_metric_rises_under_load(sim_factory: Any, corral_factory: Any) -> None:
    """corral_gpu_utilization_ratio for a backend's GPU goes up while streams run on it."""
    big, small, corral = two_gpus(sim_factory, corral_factory)
    for sim in (big, small):
        sim.config.tokens = 200
        sim.config.token_interval_s = 0.02
    util = 'corral_gpu_utilization_ratio{backend="big"'
    with httpx.Client(base_url=corral.url, timeout=30) as client:
        assert poll(lambda: client.get("/metrics").text.count(util) == 1, 5)
        assert metric(client, util) == 0
        done = threading.Event()

        def stream() -> None:
            with httpx.Client(base_url=corral.url, timeout=30) as c:
                c.post("/api/generate", json={"model": "mixtral:8x7b", "prompt": "x"})
            done.set()

        workers = [threading.Thread(target=stream) for _ in range(3)]
        for w in workers:
            w.start()
        assert poll(lambda: metric(client, util) > 0.8, 10)
        for w in workers:
            w.join(30)
        assert done.is_set()
        assert poll(lambda: metric(client, util) == 0, 5)


def test_local_gpus_through_nvml_with_backends_mapped_by_index(
    sim_factory: Any, corral_factory: Any
) -> None:
    """With NVML (scripted from real H100 readings) gpu = 0 / 1 map backends to local GPUs."""
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory(
        [{"id": "a", "url": a.url, "gpu": 0}, {"id": "b", "url": b.url, "gpu": l4_idle().uuid}],
        gpu_sampler=NvmlSampler(FakeNvml([h100_idle(), l4_idle()])),
        gpu={"poll_s": 0.1},
    )
    with httpx.Client(base_url=corral.url, timeout=10) as client:
        status = client.get("/api/v1/loadbalancer/gpus").json()
        assert status["nvml"] is True
        assert [(g["index"], g["name"], g["backends"]) for g in status["gpus"]] == [
            (0, "NVIDIA H100 80GB HBM3", ["a"]),
            (1, "NVIDIA L4", ["b"]),
        ]
        text = client.get("/metrics").text
        assert (
            'corral_gpu_memory_total_bytes{backend="a",gpu="0",'
            f'name="NVIDIA H100 80GB HBM3",uuid="{h100_idle().uuid}"}} 8.5520809984e+10' in text
        )
        assert loads(client)["a"]["gpu_stats"]["temperature_c"] == 36
