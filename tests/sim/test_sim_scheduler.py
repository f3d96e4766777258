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


async def idle(s: Scheduler, m: SimModel, keep_alive: float | None = None) -> None:
    """Load ``m`` (if needed) and leave it idle."""
    s.release(await s.acquire(m.name, m, keep_alive, {}))


async def test_fourth_model_evicts_the_idle_runner_ollama_picks() -> None:
    """At three loaded models a fourth evicts the idle one with the shortest keep-alive, ties
    broken by name; forever (negative keep_alive) goes last."""
    a, b, c, d, e = (model(f"{n}:latest", 1) for n in "abcde")
    s = sched(a, b, c, d, e, vram_gb=80)
    await idle(s, a, math.inf)
    await idle(s, b, 60)
    await idle(s, c)
    await idle(s, d)
    assert sorted(s.runners) == ["a:latest", "c:latest", "d:latest"]
    await idle(s, e)
    assert sorted(s.runners) == ["a:latest", "d:latest", "e:latest"]
    assert (s.counters.loads, s.counters.evictions) == (5, 2)


async def test_fourth_model_waits_for_the_first_runner_in_order_when_all_are_busy() -> None:
    """With three busy runners a fourth model waits for the first in eviction order to go idle;
    another runner going idle meanwhile does not help it (as in Ollama)."""
    a, b, c, d = (model(f"{n}:latest", 1) for n in "abcd")
    s = sched(a, b, c, d, vram_gb=80)
    ra, rb, rc = [await s.acquire(m.name, m, None, {}) for m in (a, b, c)]
    task = asyncio.create_task(s.acquire("d:latest", d, None, {}))
    await asyncio.sleep(0.02)
    s.release(rb)
    await asyncio.sleep(0.02)
    assert not task.done()
    assert ra.keep_alive_s == 0  # marked to unload when its last request ends
    s.release(ra)
    s.release(await asyncio.wait_for(task, 1))
    assert sorted(s.runners) == ["b:latest", "c:latest", "d:latest"]
    s.release(rc)


async def test_no_cap_with_max_loaded_models_zero() -> None:
    """max_loaded_models 0 loads as many models as VRAM holds."""
    models = [model(f"{n}:latest", 1) for n in "abcde"]
    s = sched(*models, vram_gb=80, max_loaded_models=0)
    for m in models:
        await idle(s, m)
    assert len(s.runners) == 5


async def test_vram_eviction_follows_the_same_order() -> None:
    """When VRAM is short the victim is also the shortest keep-alive, then the first name."""
    a, b, c = model("a:latest", 4), model("b:latest", 4), model("c:latest", 4)
    s = sched(a, b, c)
    await idle(s, b)
    await idle(s, a)
    await idle(s, c)
    assert sorted(s.runners) == ["b:latest", "c:latest"]
    assert s.counters.evictions == 1


async def test_loaded_model_skips_the_queue_but_cold_requests_wait_behind_a_load() -> None:
    """While one model loads, a request for a loaded model is served at once; a request that
    needs another load waits until the first load is done (one pending queue)."""
    a, b, c = model("a:latest", 1), model("b:latest", 1), model("c:latest", 1)
    s = sched(a, b, c, vram_gb=80)
    await idle(s, a)
    s.config.load_s = 0.05
    start = time.perf_counter()
    tb = asyncio.create_task(s.acquire("b:latest", b, None, {}))
    tc = asyncio.create_task(s.acquire("c:latest", c, None, {}))
    await asyncio.sleep(0.01)
    ra = await asyncio.wait_for(s.acquire("a:latest", a, None, {}), 0.02)
    assert not tb.done()
    assert s.pending == 2
    rb = await tb
    assert not tc.done()
    rc = await tc
    assert time.perf_counter() - start >= 0.1
    for r in (ra, rb, rc):
        s.release(r)
    assert s.counters.load_s == pytest.approx(0.1, abs=0.05)


async def test_load_time_follows_size() -> None:
    """A load takes load_s plus the footprint at load_gbps."""
    a = model("a:latest", 0.16)
    s = sched(a, load_s=0.01, load_gbps=4)
    assert s.load_seconds(a) == pytest.approx(0.05)
    start = time.perf_counter()
    await idle(s, a)
    assert 0.05 <= time.perf_counter() - start < 0.3
    assert sched(a).load_seconds(a) == 0


async def test_other_num_ctx_reloads_and_counts() -> None:
    """A request with another num_ctx reloads the runner: a load and a reload, no eviction."""
    a = model("a:latest", 1)
    s = sched(a)
    await idle(s, a)
    runner = await s.acquire("a:latest", a, None, {"num_ctx": 2048})
    assert runner.context_length == 2048
    assert s.runners["a:latest"] is runner
    s.release(runner)
    s.release(await s.acquire("a:latest", a, None, {"num_ctx": 2048}))
    assert (s.counters.loads, s.counters.reloads, s.counters.evictions) == (2, 1, 0)


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
    config.update({"max_loaded_models": 1, "load_gbps": 2.5, "prefill_tps": 800})
    assert (config.max_loaded_models, config.load_gbps, config.prefill_tps) == (1, 2.5, 800)
    assert config.timing_json()["max_loaded_models"] == 1
    with pytest.raises(ValueError, match="field"):
        config.update({"max_loaded_models": 1.5})
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
