"""The simulator's GPU on ``GET /_sim/dcgm``, read the way corral reads a real dcgm-exporter,
and the recorded dcgm-exporter sample page that page imitates."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.sim import SimConfig, create_sim_app
from corral.sim.app import SimApp
from corral.sim.config import GIB
from tests.helpers import DATA_DIR, sim_cli, until

SAMPLE = DATA_DIR / "dcgm-exporter-sample.txt"
MIB = 1024**2
LABELS = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"]
REQUIRED = {
    "DCGM_FI_DEV_SM_CLOCK": "gauge",
    "DCGM_FI_DEV_MEM_CLOCK": "gauge",
    "DCGM_FI_DEV_GPU_TEMP": "gauge",
    "DCGM_FI_DEV_POWER_USAGE": "gauge",
    "DCGM_FI_DEV_GPU_UTIL": "gauge",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "gauge",
    "DCGM_FI_DEV_FB_FREE": "gauge",
    "DCGM_FI_DEV_FB_USED": "gauge",
    "DCGM_FI_DEV_FB_RESERVED": "gauge",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "counter",
}
GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}
LLAMA_MIB = 2019393189 // MIB  # llama3.2:latest's runner footprint


def parse(text: str) -> dict[str, dict[str, Any]]:
    """Families by name: ``{"type": ..., "samples": {gpu index: (labels, value)}}``."""
    families: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        samples = {s.labels["gpu"]: (s.labels, s.value) for s in family.samples}
        families[family.name] = {"type": family.type, "samples": samples}
    return families


def value(families: dict[str, dict[str, Any]], name: str, gpu: str = "0") -> float:
    result: float = families[name]["samples"][gpu][1]
    return result


@pytest.fixture
def app() -> SimApp:
    return create_sim_app(SimConfig(tokens=4))


async def dcgm(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    resp = await client.get("/_sim/dcgm")
    assert resp.status_code == 200
    return parse(resp.text)


async def test_page_is_dcgm_exporter_shaped(client: httpx.AsyncClient) -> None:
    """/_sim/dcgm answers Prometheus text with HELP/TYPE per field, the exporter's label set in
    its order on every sample, and is not counted in the sim's stats."""
    resp = await client.get("/_sim/dcgm")
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = resp.text.splitlines()
    assert lines[0].startswith("# HELP DCGM_FI_DEV_SM_CLOCK ")
    assert lines[1] == "# TYPE DCGM_FI_DEV_SM_CLOCK gauge"
    families = parse(resp.text)
    for name, kind in REQUIRED.items():
        assert families[name]["type"] == kind, name
    for family in families.values():
        labels, _ = family["samples"]["0"]
        assert list(labels) == LABELS
    labels, _ = families["DCGM_FI_DEV_GPU_TEMP"]["samples"]["0"]
    assert labels["device"] == "nvidia0"
    assert labels["modelName"] == "Simulated GPU 24GB"
    assert labels["Hostname"] == "sim"
    assert re.fullmatch(r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", labels["UUID"])
    assert re.fullmatch(r"00000000:[0-9A-F]{2}:00\.0", labels["pci_bus_id"])
    assert re.search(r"^DCGM_FI_DEV_POWER_USAGE\{.*\} \d+\.\d{6}$", resp.text, re.M)  # Go's %f
    assert (await client.get("/_sim/stats")).json()["requests_total"] == 0


async def test_memory_follows_loaded_models(client: httpx.AsyncClient) -> None:
    """FB_USED is the idle base plus the loaded runners' VRAM; it falls back after
    /_sim/unload and after a keep_alive 0 request; FB_FREE is the rest of vram_bytes."""
    idle = await dcgm(client)
    base = value(idle, "DCGM_FI_DEV_FB_USED")
    assert 256 <= base <= 1024
    assert base + value(idle, "DCGM_FI_DEV_FB_FREE") == 24 * GIB // MIB
    assert (await client.post("/api/generate", json=GEN)).status_code == 200
    loaded = await dcgm(client)
    assert value(loaded, "DCGM_FI_DEV_FB_USED") == base + LLAMA_MIB
    assert value(loaded, "DCGM_FI_DEV_FB_FREE") == 24 * GIB // MIB - base - LLAMA_MIB
    await client.post("/_sim/unload")
    assert value(await dcgm(client), "DCGM_FI_DEV_FB_USED") == base
    await client.post("/api/generate", json={**GEN, "keep_alive": 0})
    assert value(await dcgm(client), "DCGM_FI_DEV_FB_USED") == base


async def test_utilization_temperature_and_power_follow_load(
    app: SimApp, client: httpx.AsyncClient
) -> None:
    """Idle: ~0 % util, ~35 C, ~70 W. With four streams generating: util >= 90 %, hotter, more
    power. Back to idle once they finish."""
    idle = await dcgm(client)
    assert value(idle, "DCGM_FI_DEV_GPU_UTIL") == 0
    assert 30 <= value(idle, "DCGM_FI_DEV_GPU_TEMP") <= 40
    assert value(idle, "DCGM_FI_DEV_POWER_USAGE") == pytest.approx(70, abs=10)
    app.config.tokens, app.config.token_interval_s = 30, 0.02
    streams = [asyncio.create_task(client.post("/api/generate", json=GEN)) for _ in range(4)]

    async def busy() -> dict[str, dict[str, Any]] | None:
        page = await dcgm(client)
        return page if value(page, "DCGM_FI_DEV_GPU_UTIL") >= 90 else None

    page = await until(busy, timeout_s=5.0)
    assert value(page, "DCGM_FI_DEV_GPU_UTIL") <= 99
    assert value(page, "DCGM_FI_DEV_GPU_TEMP") > value(idle, "DCGM_FI_DEV_GPU_TEMP") + 30
    assert value(page, "DCGM_FI_DEV_POWER_USAGE") > 300
    assert value(page, "DCGM_FI_DEV_MEM_COPY_UTIL") > 0
    assert all(r.status_code == 200 for r in await asyncio.gather(*streams))
    after = await dcgm(client)
    assert value(after, "DCGM_FI_DEV_GPU_UTIL") == 0
    assert value(after, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") > value(
        idle, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
    )


async def test_config_overrides(client: httpx.AsyncClient) -> None:
    """PUT /_sim/config sets the GPU's temperature, utilization, power limit and identity;
    bad values are rejected; None goes back to the load-derived figures."""
    r = await client.put("/_sim/config", json={"gpu_temp_c": 90})
    assert r.json()["gpu_temp_c"] == 90
    assert value(await dcgm(client), "DCGM_FI_DEV_GPU_TEMP") == 90
    await client.put("/_sim/config", json={"gpu_util_pct": 50, "power_limit_w": 270})
    page = await dcgm(client)
    assert value(page, "DCGM_FI_DEV_GPU_UTIL") == 50
    assert value(page, "DCGM_FI_DEV_POWER_USAGE") == pytest.approx(170)
    assert value(page, "DCGM_FI_DEV_POWER_MGMT_LIMIT") == 270
    await client.put(
        "/_sim/config", json={"gpu_name": "NVIDIA L4", "gpu_uuid": "GPU-x", "gpu_index": 2}
    )
    labels, _ = (await dcgm(client))["DCGM_FI_DEV_FB_USED"]["samples"]["2"]
    assert (labels["modelName"], labels["UUID"], labels["device"]) == (
        "NVIDIA L4", "GPU-x", "nvidia2"
    )  # fmt: skip
    for bad in ({"gpu_util_pct": 101}, {"gpu_name": 5}, {"gpu_temp_c": "hot"}):
        assert (await client.put("/_sim/config", json=bad)).status_code == 400
    await client.put("/_sim/config", json={"gpu_temp_c": None, "gpu_util_pct": None})
    page = await dcgm(client)
    assert value(page, "DCGM_FI_DEV_GPU_UTIL", "2") == 0
    assert value(page, "DCGM_FI_DEV_GPU_TEMP", "2") < 40


def test_derived_gpu_identity() -> None:
    """Without overrides the name follows vram_bytes and the UUID is stable per sim name."""
    config = SimConfig(name="gpu-a", vram_bytes=80 * GIB)
    assert config.reported_gpu_name == "Simulated GPU 80GB"
    assert config.reported_gpu_uuid == SimConfig(name="gpu-a").reported_gpu_uuid
    assert config.reported_gpu_uuid != SimConfig(name="gpu-b").reported_gpu_uuid
    assert config.timing_json()["gpu_name"] == "Simulated GPU 80GB"


def test_cli_gpu_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``corral sim --gpu-*`` options land in the SimConfig it serves."""
    invoke, seen = sim_cli(monkeypatch)
    args = ["--gpu-name", "NVIDIA L4", "--gpu-index", "1", "--gpu-temp-c", "88"]
    result = invoke([*args, "--gpu-util-pct", "40", "--power-limit-w", "72"])
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert (config.gpu_name, config.gpu_index, config.gpu_temp_c) == ("NVIDIA L4", 1, 88)
    assert (config.gpu_util_pct, config.power_limit_w, config.gpu_uuid) == (40, 72, "")
    assert invoke(["--gpu-util-pct", "120"]).exit_code != 0


def test_exporter_sample_has_two_gpus() -> None:
    """The recorded dcgm-exporter page parses into an H100 and an L4 with every default field,
    the exporter's labels in order, and used + free + reserved equal to each card's memory."""
    families = parse(SAMPLE.read_text())
    for name, kind in REQUIRED.items():
        assert families[name]["type"] == kind, name
        assert set(families[name]["samples"]) == {"0", "1"}, name
    temps = families["DCGM_FI_DEV_GPU_TEMP"]["samples"]
    assert [list(temps[g][0]) for g in ("0", "1")] == [LABELS, LABELS]
    assert temps["0"][0]["modelName"] == "NVIDIA H100 80GB HBM3"
    assert temps["1"][0]["modelName"] == "NVIDIA L4"
    assert temps["0"][0]["UUID"] != temps["1"][0]["UUID"]
    for gpu, card_mib in (("0", 81559), ("1", 23034)):
        fb = sum(
            value(families, f"DCGM_FI_DEV_FB_{part}", gpu) for part in ("USED", "FREE", "RESERVED")
        )
        assert fb == card_mib
    assert value(families, "DCGM_FI_DEV_GPU_UTIL", "0") > 90
    assert value(families, "DCGM_FI_DEV_GPU_UTIL", "1") == 0


async def test_sim_page_matches_the_sample(client: httpx.AsyncClient) -> None:
    """The simulator shows every field the sample shows for a PCIe GPU (no NVLink), with the
    same types and label names."""
    sample = parse(SAMPLE.read_text())
    sim = await dcgm(client)
    for name, family in sample.items():
        if "NVLINK" in name:
            continue
        assert sim[name]["type"] == family["type"], name
        assert list(sim[name]["samples"]["0"][0]) == list(family["samples"]["0"][0])
