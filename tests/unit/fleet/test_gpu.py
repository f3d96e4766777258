"""GPU readings and GPU-aware routing, with a scripted NVML built from real H100 readings."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from corral.balancer.routing import Router
from corral.config import BalancerSettings, GpuSettings, load_config
from corral.errors import ConfigError
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model
from corral.fleet.gpu import NullSampler, NvmlSampler, detect_local_gpus, open_sampler
from corral.fleet.gpu.dcgm import DcgmFormatError, parse_dcgm
from corral.fleet.gpu.poller import GpuPoller
from corral.metrics import Metrics
from tests.fake_nvml import FakeNvml, h100_idle, l4_idle, load_sample
from tests.helpers import DATA_DIR, FakeClock, backend, loaded

GB = 10**9
H100_UUID = load_sample()["idle"][0]["uuid"]
L4_UUID = l4_idle().uuid


def fleet(
    *backends: BackendState,
    nvml: FakeNvml | None = None,
    strategy: str = "least_connections",
    clock: FakeClock | None = None,
    **gpu: Any,
) -> tuple[GpuPoller, Router, Metrics]:
    registry = BackendRegistry(backends)
    metrics = Metrics()
    clock = clock or FakeClock()
    sampler = open_sampler(True, nvml or FakeNvml([h100_idle(), l4_idle()]))
    poller = GpuPoller(registry, GpuSettings(**gpu), metrics, sampler, clock=clock)
    router = Router(registry, BalancerSettings(strategy=strategy), clock=clock)
    return poller, router, metrics


def sample_value(metrics: Metrics, metric: str, **labels: str) -> float | None:
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def picks(router: Router, model: str, n: int = 40) -> Counter[str]:
    got: Counter[str] = Counter()
    for _ in range(n):
        chosen = router.pick(model, normalize_model(model), "generate")
        assert chosen is not None
        got[chosen.id] += 1
    return got


# Detection --------------------------------------------------------------------------------


def test_nvml_reads_every_field_of_the_recorded_h100() -> None:
    """Name, UUID, memory, utilization, temperature and power come through with their units."""
    idle = load_sample()["idle"][0]
    sampler = NvmlSampler(FakeNvml())
    [gpu] = sampler.sample()
    assert gpu.index == 0
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.uuid == idle["uuid"]
    assert gpu.memory_total_bytes == idle["memory"]["total"]
    assert gpu.memory_used_bytes == idle["memory"]["used"]
    assert gpu.memory_free_bytes == idle["memory"]["total"] - idle["memory"]["used"]
    assert gpu.utilization_ratio == 0
    assert gpu.temperature_c == idle["temperature_c"]
    assert gpu.power_w == pytest.approx(idle["power_mw"] / 1000)
    assert gpu.power_limit_w == pytest.approx(700)
    assert sampler.driver == load_sample()["driver"]
    sampler.close()


def test_unsupported_field_is_none_not_an_error() -> None:
    """A GPU without power readings still reports everything else."""
    gpu = h100_idle()
    gpu.power_mw = None
    [reading] = NvmlSampler(FakeNvml([gpu])).sample()
    assert reading.power_w is None
    assert reading.temperature_c == 36


def test_nvml_missing_turns_gpu_features_off_with_a_reason() -> None:
    """No NVML library: a null sampler that says why; detection answers no GPUs and the reason."""
    sampler = open_sampler(True, FakeNvml(missing=True))
    assert isinstance(sampler, NullSampler)
    assert "NVML Shared Library Not Found" in sampler.reason
    assert sampler.sample() == []
    gpus, reason = detect_local_gpus(FakeNvml(missing=True))
    assert gpus == []
    assert reason is not None
    assert "not available" in reason
    assert isinstance(open_sampler(False, FakeNvml()), NullSampler)


def test_detect_local_gpus_lists_both_and_shuts_nvml_down() -> None:
    nvml = FakeNvml([h100_idle(), l4_idle()])
    gpus, reason = detect_local_gpus(nvml)
    assert reason is None
    assert [(g.index, g.name) for g in gpus] == [(0, "NVIDIA H100 80GB HBM3"), (1, "NVIDIA L4")]
    assert nvml.shutdowns == 1


async def test_poll_with_nvml_missing_leaves_routing_alone() -> None:
    """Without NVML nothing is known: no VRAM, nothing hot, weights 1.0, requests flow."""
    a, b = loaded(backend("a", "m", gpu=0), "m"), loaded(backend("b", "m", gpu=1), "m")
    poller, router, _ = fleet(a, b, nvml=FakeNvml(missing=True))
    await poller.poll()
    assert (a.vram_total_bytes, a.gpu_hot, router.weight_of(a)) == (None, False, 1.0)
    assert set(picks(router, "m")) == {"a", "b"}
    assert {g["source"] for g in poller.status()["gpus"]} == {"ollama"}  # /api/ps only


# Mapping ----------------------------------------------------------------------------------


async def test_backends_map_to_gpus_by_index_uuid_and_list() -> None:
    """gpu = 1, gpu = "GPU-…" (any case) and gpu = [0, 1] each find their GPUs."""
    by_index = backend("by_index", gpu=1)
    by_uuid = backend("by_uuid", gpu=H100_UUID.lower())
    both = backend("both", gpu=[0, L4_UUID])
    none = backend("none")
    missing = backend("missing", gpu=7)
    poller, _, _ = fleet(by_index, by_uuid, both, none, missing)
    await poller.poll()
    assert [g.name for g in poller.gpus_of(by_index)] == ["NVIDIA L4"]
    assert [g.name for g in poller.gpus_of(by_uuid)] == ["NVIDIA H100 80GB HBM3"]
    assert len(poller.gpus_of(both)) == 2
    assert both.vram_total_bytes == h100_idle().memory_total + l4_idle().memory_total
    assert by_index.vram_total_bytes == l4_idle().memory_total
    assert by_uuid.vram_free_bytes == h100_idle().memory_total - h100_idle().memory_used
    assert poller.gpus_of(none) == []
    assert none.vram_total_bytes is None
    assert poller.gpus_of(missing) == []
    entries = {e["name"]: e for e in poller.status()["gpus"]}
    assert entries["NVIDIA L4"]["backends"] == ["both", "by_index"]
    assert entries["NVIDIA H100 80GB HBM3"]["backends"] == ["both", "by_uuid"]


def test_config_accepts_index_uuid_and_list_and_rejects_nonsense(tmp_path: Any) -> None:
    """gpu takes an index, a UUID or a list; a negative index or a random word is an error."""
    ok = load_config(
        None,
        overrides={
            "backends": [
                {"id": "a", "url": "http://127.0.0.1:1", "gpu": "0"},
                {"id": "b", "url": "http://127.0.0.1:2", "gpu": H100_UUID},
                {"id": "c", "url": "http://127.0.0.1:3", "gpu": [0, 1]},
                {
                    "id": "d",
                    "url": "http://10.0.0.2:11434",
                    "gpu_metrics_url": "http://10.0.0.2:9400/metrics",
                },
            ]
        },
        env={},
    )
    assert [b.gpu for b in ok.backends] == [0, H100_UUID, [0, 1], None]
    assert ok.backends[3].gpu_metrics_url == "http://10.0.0.2:9400/metrics"
    for bad in (-1, "fast", [], True):
        with pytest.raises(ConfigError, match=r"backends\.0\.gpu"):
            load_config(
                None,
                overrides={"backends": [{"id": "a", "url": "http://127.0.0.1:1", "gpu": bad}]},
                env={},
            )
    with pytest.raises(ConfigError, match="gpu_metrics_url"):
        load_config(
            None,
            overrides={
                "backends": [
                    {"id": "a", "url": "http://127.0.0.1:1", "gpu_metrics_url": "dcgm:9400"}
                ]
            },
            env={},
        )


# NVML failing mid-run -----------------------------------------------------------------------


async def test_nvml_error_mid_run_is_counted_retried_and_never_fatal() -> None:
    """A poll that raises is counted; the last readings stay until stale; the next poll recovers."""
    clock = FakeClock()
    nvml = FakeNvml([h100_idle(), l4_idle()])
    a = backend("a", "m", gpu=0)
    poller, router, metrics = fleet(a, nvml=nvml, clock=clock, poll_s=2)
    await poller.poll()
    assert a.vram_total_bytes == h100_idle().memory_total
    nvml.fail_next = 1
    clock.now += 2
    await poller.poll()  # raises inside, never out
    assert sample_value(metrics, "corral_gpu_poll_errors_total", source="nvml") == 1
    assert poller.status()["nvml_error"] == "GPU is lost"
    assert a.vram_total_bytes == h100_idle().memory_total  # still fresh
    nvml.fail_next = 100
    clock.now += 60
    await poller.poll()
    assert a.vram_total_bytes is None  # stale readings are not trusted
    assert router.pick("m", "m:latest", "generate") is a  # routing goes on
    nvml.fail_next = 0
    await poller.poll()
    assert poller.status()["nvml_error"] is None
    assert a.vram_total_bytes == h100_idle().memory_total
    assert sample_value(metrics, "corral_gpu_poll_errors_total", source="nvml") == 2


async def test_poller_run_survives_errors_until_cancelled() -> None:
    """run() keeps polling after errors; cancelling it is the stop signal."""
    nvml = FakeNvml()
    nvml.fail_next = 3
    poller, _, metrics = fleet(backend("a", gpu=0), nvml=nvml, poll_s=0.01)
    task = asyncio.create_task(poller.run())
    for _ in range(500):  # bounded poll: up to 5 s
        if poller.local:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sample_value(metrics, "corral_gpu_poll_errors_total", source="nvml") == 3


# Heat -------------------------------------------------------------------------------------


async def test_hot_gpu_is_avoided_then_readmitted_after_it_cools() -> None:
    """At max_temp_c a GPU's backend gets nothing; it stays out until below the hysteresis."""
    h100, l4 = h100_idle(), l4_idle()
    nvml = FakeNvml([h100, l4])
    a, b = loaded(backend("a", "m", gpu=0), "m"), loaded(backend("b", "m", gpu=1), "m")
    poller, router, metrics = fleet(a, b, nvml=nvml, max_temp_c=85, temp_hysteresis_c=5)
    await poller.poll()
    assert set(picks(router, "m")) == {"a", "b"}
    h100.temperature_c = 85
    await poller.poll()
    assert a.gpu_hot
    assert picks(router, "m") == Counter(b=40)
    h100.temperature_c = 82  # cooler, but not below 85 - 5
    await poller.poll()
    assert picks(router, "m") == Counter(b=40)
    h100.temperature_c = 86  # same episode: counted once
    await poller.poll()
    hot = sample_value(metrics, "corral_gpu_events_total", event="hot", uuid=h100.uuid)
    assert hot == 1
    h100.temperature_c = 79
    await poller.poll()
    assert not a.gpu_hot
    assert set(picks(router, "m")) == {"a", "b"}
    assert poller.status()["gpus"][0]["hot"] is False


async def test_every_gpu_hot_still_serves() -> None:
    """Avoided, not refused: when every GPU with the model is hot, requests still go there."""
    h100 = h100_idle()
    h100.temperature_c = 95
    a = backend("a", "m", gpu=0)
    poller, router, _ = fleet(a, nvml=FakeNvml([h100]))
    await poller.poll()
    assert a.gpu_hot
    assert router.pick("m", "m:latest", "generate") is a


async def test_hot_gpu_busy_peer_means_wait_not_hot() -> None:
    """A cool backend that is full is waited for rather than sending to the hot one."""
    h100 = h100_idle()
    a, b = backend("a", "m", gpu=0), backend("b", "m", gpu=1, max_concurrent=1)
    poller, router, _ = fleet(a, b, nvml=FakeNvml([h100, l4_idle()]))
    h100.temperature_c = 90
    await poller.poll()
    b.in_flight = 1
    assert router.pick("m", "m:latest", "generate") is None


# VRAM -------------------------------------------------------------------------------------


async def test_model_too_big_for_the_small_gpu_goes_to_the_big_one() -> None:
    """A 40 GB model never lands on the 24 GB L4 while the H100 can hold it; small ones spread."""
    big = loaded(backend("big", "llama3.1:70b", "llama3.2", gpu=0), "llama3.2")
    small = loaded(backend("small", "llama3.1:70b", "llama3.2", gpu=1), "llama3.2")
    for b in (big, small):
        b.model_sizes = {"llama3.1:70b": 42_520_412_561, "llama3.2:latest": 2_019_393_189}
    poller, router, _ = fleet(big, small)
    await poller.poll()
    assert picks(router, "llama3.1:70b") == Counter(big=40)
    assert set(picks(router, "llama3.2")) == {"big", "small"}
    big.healthy = False  # only the small GPU left: serve anyway (Ollama offloads to CPU)
    assert router.pick("llama3.1:70b", "llama3.1:70b", "generate") is small


async def test_too_big_beats_no_room_right_now() -> None:
    """The H100 is busy with other models (no room now) but can hold the model once it evicts;
    the L4 never can: the model still goes to the H100."""
    h100 = h100_idle()
    h100.memory_used = h100.memory_total - 10 * GB
    big, small = backend("big", "mixtral:8x7b", gpu=0), backend("small", "mixtral:8x7b", gpu=1)
    for b in (big, small):
        b.model_sizes = {"mixtral:8x7b": 26_442_481_545}
    poller, router, _ = fleet(big, small, nvml=FakeNvml([h100, l4_idle()]))
    await poller.poll()
    assert picks(router, "mixtral:8x7b") == Counter(big=40)


async def test_gpu_without_room_ranks_below_one_with_room() -> None:
    """A model not loaded anywhere goes where it fits in free VRAM, not where it would evict."""
    h100, l4 = h100_idle(), l4_idle()
    h100.memory_used = h100.memory_total - 1 * GB  # full of other models
    full, roomy = backend("full", "qwen2.5:7b", gpu=0), backend("roomy", "qwen2.5:7b", gpu=1)
    for b in (full, roomy):
        b.model_sizes = {"qwen2.5:7b": 4_683_087_332}
    poller, router, _ = fleet(full, roomy, nvml=FakeNvml([h100, l4]))
    await poller.poll()
    assert picks(router, "qwen2.5:7b") == Counter(roomy=40)
    roomy.loading.clear()  # as if those requests had gone elsewhere
    loaded(full, "qwen2.5:7b", size=4_683_087_332)  # loaded there: it wins
    assert picks(router, "qwen2.5:7b") == Counter(full=40)


async def test_weights_come_from_vram_when_not_configured() -> None:
    """weighted_round_robin: H100 80 GB → 3.0, L4 24 GB → 1.5, so 2:1; a configured weight wins."""
    a, b = loaded(backend("a", "m", gpu=0), "m"), loaded(backend("b", "m", gpu=1), "m")
    poller, router, _ = fleet(a, b, strategy="weighted_round_robin")
    await poller.poll()
    assert (router.weight_of(a), router.weight_of(b)) == (3.0, 1.5)
    assert picks(router, "m", 30) == Counter(a=20, b=10)
    b.weight = 3.0
    assert picks(router, "m", 30) == Counter(a=15, b=15)


# Utilization and metrics -------------------------------------------------------------------


async def test_underused_gpu_with_requests_in_flight_is_logged_once_per_episode() -> None:
    """Requests in flight but the GPU idle for two polls: one event; busy again ends it."""
    nvml = FakeNvml()
    a = backend("a", "m", gpu=0)
    poller, _, metrics = fleet(a, nvml=nvml)
    a.in_flight = 2
    for _ in range(4):
        await poller.poll()
    assert sample_value(metrics, "corral_gpu_events_total", event="underutilized") == 1
    while nvml.replay_load() and nvml.gpus[0].util_gpu < 90:
        pass
    await poller.poll()  # busy: the episode ends
    nvml.gpus[0].util_gpu = 10
    await poller.poll()
    await poller.poll()
    assert sample_value(metrics, "corral_gpu_events_total", event="underutilized") == 2


async def test_gpu_gauges_follow_the_recorded_load() -> None:
    """corral_gpu_* carry gpu, uuid, name and backend labels and rise with the H100's load."""
    nvml = FakeNvml()
    poller, _, metrics = fleet(backend("gpu0", gpu=0), nvml=nvml)
    await poller.poll()
    labels = {"gpu": "0", "uuid": H100_UUID, "name": "NVIDIA H100 80GB HBM3", "backend": "gpu0"}
    assert sample_value(metrics, "corral_gpu_utilization_ratio", **labels) == 0
    assert sample_value(metrics, "corral_gpu_memory_total_bytes", **labels) == 85520809984
    seen = []
    while nvml.replay_load():
        await poller.poll()
        seen.append(sample_value(metrics, "corral_gpu_utilization_ratio", **labels))
    assert seen[0] == 0
    assert seen[-1] == pytest.approx(0.99)
    assert sample_value(metrics, "corral_gpu_temperature_celsius", **labels) == 54
    assert sample_value(metrics, "corral_gpu_power_watts", **labels) == pytest.approx(690.979)
    assert sample_value(metrics, "corral_gpu_memory_used_bytes", **labels) == 1429012480


async def test_api_ps_gives_coarse_vram_when_nothing_else_does() -> None:
    """A backend with no GPU source shows the VRAM its loaded models hold, from /api/ps."""
    remote = backend("remote", "m")
    remote.resident = {"m:latest": {"size": 3_000_000_000, "size_vram": 2_500_000_000}}
    poller, _, _ = fleet(remote)
    await poller.poll()
    summary = poller.backend_summary(remote)
    assert summary is not None
    assert (summary["source"], summary["memory_used_bytes"]) == ("ollama", 2_500_000_000)
    [entry] = poller.status()["gpus"][2:]
    assert entry["backends"] == ["remote"]
    assert entry["source"] == "ollama"


# DCGM exporter (remote hosts) -----------------------------------------------------------------

DCGM_SAMPLE = DATA_DIR / "dcgm-exporter-sample.txt"
MIB = 1024**2


def test_dcgm_page_parses_into_one_reading_per_gpu() -> None:
    """The exporter's page gives both GPUs with MiB → bytes, % → ratio, W and °C as they are."""
    h100, l4 = parse_dcgm(DCGM_SAMPLE.read_text(), host="10.0.0.7")
    assert (h100.index, h100.name, l4.index, l4.name) == (
        0,
        "NVIDIA H100 80GB HBM3",
        1,
        "NVIDIA L4",
    )
    assert h100.uuid.startswith("GPU-")
    assert h100.memory_used_bytes == 42318 * MIB
    assert h100.memory_total_bytes == (42318 + 38662 + 579) * MIB  # used + free + reserved
    assert l4.memory_total_bytes == 23034 * MIB
    assert h100.utilization_ratio == pytest.approx(0.97)
    assert (h100.temperature_c, l4.temperature_c) == (51, 33)
    assert h100.power_w == pytest.approx(412.517)
    assert (h100.source, h100.host) == ("dcgm", "gpu-node-07")


def test_dcgm_garbage_is_a_clear_error() -> None:
    with pytest.raises(DcgmFormatError, match="no DCGM"):
        parse_dcgm("# HELP up Up.\n# TYPE up gauge\nup 1\n")
    with pytest.raises(DcgmFormatError):
        parse_dcgm("<html>not metrics</html>{{{")


async def test_remote_backends_read_their_gpus_from_the_exporter() -> None:
    """gpu_metrics_url + gpu picks that GPU off the page: weights, fit and heat all follow."""
    page = DCGM_SAMPLE.read_text()
    pages = {"http://10.0.0.7:9400/metrics": page}
    fetched: list[str] = []

    async def fetch(url: str, timeout_s: float) -> bytes:
        fetched.append(url)
        if url not in pages:
            raise ConnectionRefusedError(f"cannot connect to {url}")
        return pages[url].encode()

    url = "http://10.0.0.7:9400/metrics"
    big = backend("big", "mixtral:8x7b", gpu=0, gpu_metrics_url=url)
    small = backend("small", "mixtral:8x7b", gpu="GPU-67314b6c-7408-2d97-59a9-c3add0cc671d")
    small.gpu_metrics_url = url
    gone = backend("gone", "mixtral:8x7b", gpu_metrics_url="http://10.0.0.9:9400/metrics")
    for b in (big, small, gone):
        b.model_sizes = {"mixtral:8x7b": 26_442_481_545}
        loaded(b, "mixtral:8x7b", size=30_000_000_000)
    registry = BackendRegistry([big, small, gone])
    metrics = Metrics()
    poller = GpuPoller(registry, GpuSettings(), metrics, NullSampler("no NVML here"), fetch=fetch)
    router = Router(registry, BalancerSettings(strategy="weighted_round_robin"))
    await poller.poll()
    assert fetched.count(url) == 1  # one scrape per exporter, however many backends use it
    assert (router.weight_of(big), router.weight_of(small), router.weight_of(gone)) == (
        3.0,
        1.5,
        1.0,
    )
    assert set(picks(router, "mixtral:8x7b")) == {"big", "gone"}  # the L4 is too small for 26 GB
    assert sample_value(metrics, "corral_gpu_poll_errors_total", source="dcgm") == 1
    status = poller.status()
    assert status["exporters"]["http://10.0.0.9:9400/metrics"]["ok"] is False
    assert {e["name"]: e["backends"] for e in status["gpus"]} == {
        "NVIDIA H100 80GB HBM3": ["big"],
        "NVIDIA L4": ["small"],
    }
    labels = {"gpu": "1", "name": "NVIDIA L4", "backend": "small"}
    assert sample_value(metrics, "corral_gpu_memory_total_bytes", **labels) == 23034 * MIB
    temp = 'DCGM_FI_DEV_GPU_TEMP{gpu="0",'
    lines = [ln[: ln.rindex(" ")] + " 91" if ln.startswith(temp) else ln for ln in page.split("\n")]
    pages[url] = "\n".join(lines)
    await poller.poll()
    assert big.gpu_hot
    assert set(picks(router, "mixtral:8x7b")) == {"gone"}
