"""The simulator's scheduler, names, durations, config updates and CLI model parsing."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import typer

from corral.sim import Faults, SimConfig, SimModel
from corral.sim.cli import parse_models
from corral.sim.config import GB, GIB
from corral.sim.harness import _flags
from corral.sim.names import parse_name, short_name
from corral.sim.scheduler import Scheduler, Slots
from corral.sim.wire import HTTPError, local_time, parse_go_duration, parse_keep_alive


def model(name: str, gb: float) -> SimModel:
    return SimModel(name, int(gb * GB))


def sched(*models: SimModel, vram_gb: float = 10, **kw: object) -> Scheduler:
    config = SimConfig(models=list(models), vram_bytes=int(vram_gb * GB), **kw)  # type: ignore[arg-type]
    return Scheduler(config)


async def test_idle_model_is_evicted_when_vram_is_short() -> None:
    """Loading B into a budget that A fills evicts idle A."""
    a, b = model("a:latest", 6), model("b:latest", 6)
    s = sched(a, b)
    s.release(await s.acquire("a:latest", a, None, {}))
    rb = await s.acquire("b:latest", b, None, {})
    assert list(s.runners) == ["b:latest"]
    assert rb.size_vram == rb.size


async def test_busy_model_is_waited_for_not_evicted() -> None:
    """A load that needs a busy runner's memory waits until that runner goes idle."""
    a, b = model("a:latest", 6), model("b:latest", 6)
    s = sched(a, b)
    ra = await s.acquire("a:latest", a, None, {})
    task = asyncio.create_task(s.acquire("b:latest", b, None, {}))
    await asyncio.sleep(0.01)
    assert not task.done()
    s.release(ra)
    rb = await asyncio.wait_for(task, 1)
    assert list(s.runners) == ["b:latest"]
    s.release(rb)


async def test_eviction_prefers_shortest_keep_alive() -> None:
    """Of two idle runners the one with the shorter keep_alive goes first."""
    a, b, c = model("a:latest", 4), model("b:latest", 4), model("c:latest", 4)
    s = sched(a, b, c)
    s.release(await s.acquire("a:latest", a, 600, {}))
    s.release(await s.acquire("b:latest", b, 60, {}))
    s.release(await s.acquire("c:latest", c, None, {}))
    assert sorted(s.runners) == ["a:latest", "c:latest"]


async def test_oversized_model_loads_partially_and_cpu_only() -> None:
    """A model larger than the budget gets size_vram = budget; num_gpu 0 gets 0."""
    big = model("big:latest", 30)
    s = sched(big, vram_gb=24)
    runner = await s.acquire("big:latest", big, None, {})
    assert runner.size_vram == 24 * GB < runner.size
    s.release(runner)
    cpu = await s.acquire("big:latest", big, None, {"num_gpu": 0})  # reload: options differ
    assert cpu.size_vram == 0


async def test_concurrent_requests_share_one_load() -> None:
    """Requests arriving while a model loads wait for that one load and share the runner."""
    a = model("a:latest", 1)
    s = sched(a, load_s=0.05)
    start = time.perf_counter()
    r1, r2 = await asyncio.gather(*(s.acquire("a:latest", a, None, {}) for _ in range(2)))
    assert r1 is r2
    assert r1.refs == 2
    assert time.perf_counter() - start < 0.095
    s.release(r1)
    s.release(r2)


async def test_cancelled_load_leaves_nothing_loaded() -> None:
    """A request cancelled while its model loads removes the half-loaded runner."""
    a = model("a:latest", 1)
    s = sched(a, load_s=5)
    task = asyncio.create_task(s.acquire("a:latest", a, None, {}))
    await asyncio.sleep(0.01)
    assert len(s.ps()) == 1  # loading models already show in /api/ps
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.runners == {}
    assert s.pending == 0


async def test_num_gpu_layers_offload_part() -> None:
    """num_gpu N below the block count puts N/blocks of the model in VRAM."""
    a = model("a:latest", 2.8)
    s = sched(a)
    runner = await s.acquire("a:latest", a, None, {"num_gpu": 14})
    assert runner.size_vram == runner.size // 2


async def test_expire_busy_model_unloads_after_last_request() -> None:
    """Unloading a busy model waits for its last request, then it is gone."""
    a = model("a:latest", 1)
    s = sched(a)
    runner = await s.acquire("a:latest", a, None, {})
    s.expire("a:latest")
    assert "a:latest" in s.runners
    s.release(runner)
    assert s.runners == {}


async def test_keep_alive_expiry_and_zero() -> None:
    """An idle runner unloads once keep_alive passed; keep_alive 0 unloads on release."""
    a = model("a:latest", 1)
    s = sched(a)
    s.release(await s.acquire("a:latest", a, 5, {}))
    s.purge_expired(time.time() + 1)
    assert "a:latest" in s.runners
    s.purge_expired(time.time() + 6)
    assert s.runners == {}
    s.release(await s.acquire("a:latest", a, 0, {}))
    assert s.runners == {}


async def test_load_queue_limit_gives_503() -> None:
    """Beyond max_queue, a request that needs a load gets Ollama's 503; loaded models do not."""
    a, b = model("a:latest", 1), model("b:latest", 1)
    s = sched(a, b, max_queue=1, load_s=0.05)
    first = asyncio.create_task(s.acquire("a:latest", a, None, {}))
    await asyncio.sleep(0)
    with pytest.raises(HTTPError) as err:
        await s.acquire("b:latest", b, None, {})
    assert err.value.status == 503
    assert "maximum pending requests exceeded" in err.value.message
    ra = await first
    s.release(await s.acquire("a:latest", a, None, {}))  # loaded: no queue involved
    s.release(ra)


async def test_slots_queue_fifo_and_cancel() -> None:
    """Slots beyond capacity wait in order; a cancelled waiter leaves the queue."""
    cap = [1]
    slots = Slots(lambda: cap[0])
    await slots.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await slots.acquire()
        order.append(i)

    t1, t2, t3 = (asyncio.create_task(take(i)) for i in (1, 2, 3))
    await asyncio.sleep(0)
    t2.cancel()
    await asyncio.sleep(0)
    slots.release()
    await asyncio.sleep(0)
    assert order == [1]
    cap[0] = 3
    slots.wake()
    await asyncio.gather(t1, t3)
    assert order == [1, 3]
    assert t2.cancelled()
    assert slots.active == 2


def test_names() -> None:
    """Names normalise to Ollama's shortest display form; invalid ones do not parse."""
    assert short_name("llama3.2") == "llama3.2:latest"
    assert short_name("registry.ollama.ai/library/Qwen2.5:7b") == "Qwen2.5:7b"
    assert short_name("user/m") == "user/m:latest"
    name = parse_name("m:q4")
    assert name is not None
    assert name.full == "registry.ollama.ai/library/m:q4"
    assert parse_name("a b") is None
    assert parse_name("") is None
    assert parse_name("a/b/c/d") is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("0", 0.0), ("-1m", -60.0),
     ("1.5s", 1.5)],
)  # fmt: skip
def test_go_durations(text: str, seconds: float) -> None:
    """Go's ParseDuration syntax."""
    assert parse_go_duration(text) == pytest.approx(seconds)


def test_keep_alive_values() -> None:
    """Numbers are seconds, negatives are forever, absent is None, bad units are 400s."""
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(30) == 30
    assert parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("-1m") == math.inf
    with pytest.raises(HTTPError, match="unknown unit"):
        parse_keep_alive("5x")
    with pytest.raises(HTTPError, match="missing unit"):
        parse_keep_alive("-1")


def test_local_time_has_offset() -> None:
    """Local times carry a zone (Z or ±hh:mm) and drop trailing zeros."""
    text = local_time(1_700_000_000.5)
    assert text[19:21] == ".5"
    assert text.endswith("Z") or text[-6] in "+-"


def test_config_updates_are_validated() -> None:
    """Partial updates reject unknown keys, wrong types and negatives, changing nothing."""
    faults = Faults()
    faults.update({"busy": True, "drop_after_tokens": 3})
    assert (faults.busy, faults.drop_after_tokens) == (True, 3)
    for bad in ({"busy": 1}, {"slow_s": -1}, {"what": 1}, {"error_rate": "x"}):
        with pytest.raises(ValueError, match="field"):
            faults.update(bad)
    config = SimConfig()
    with pytest.raises(ValueError, match="num_parallel"):
        config.update({"tokens": 3, "num_parallel": 0})
    assert config.tokens == 16


def test_parse_models_cli() -> None:
    """--models takes known names and name:size_gb; unknown names are an error."""
    models = parse_models("llama3.2, mistral ,big:30,my/m:q8:1.5")
    assert [m.name for m in models] == [
        "llama3.2:latest", "mistral:latest", "big:latest", "my/m:q8"
    ]  # fmt: skip
    assert models[2].size_bytes == 30 * GB
    assert models[0].modified_at > models[1].modified_at
    with pytest.raises(typer.BadParameter):
        parse_models("nonsense")
    assert SimConfig().vram_bytes == 24 * GIB


def test_harness_flags() -> None:
    """SimProcess keyword options map to CLI flags."""
    assert _flags({"ttft_ms": 5, "hang": True, "busy": False, "models": ["a", "b"]}) == [
        "--ttft-ms", "5", "--hang", "--models", "a,b"
    ]  # fmt: skip
