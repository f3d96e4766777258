"""What choosing a backend costs as the fleet grows: corral's Router and Admission in-process.

A registry of ``n`` backends that look like a live fleet (healthy, three models listed, every
third one, or every one, holding llama3.2 on its GPU, GPU memory known, a few requests in
flight, a probe history, a response-time estimate), then, per strategy, many timed calls
(``perf_counter_ns``):

- ``pick``: ``Router.pick()`` alone: filters, affinity, the strategy;
- ``acquire``: ``await Admission.acquire()`` then ``Admission.release()``: what a request pays
  on its way in and out when a slot is free (no queueing), on a running event loop.

No sockets, no sleeping: the numbers are CPU time on this machine's one core.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from _stats import percentile

from corral.balancer.admission import Admission
from corral.balancer.routing import Router
from corral.config import BalancerSettings, QueueSettings
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model
from corral.metrics import Metrics
from corral.strategies import strategy_names

GIB = 1024**3
MODEL = "llama3.2"
KEY = normalize_model(MODEL)
MODELS = {KEY: 2_019_393_189, "qwen2.5:7b": 4_683_087_332, "all-minilm:latest": 45_960_996}


# Fleet shapes: which backends hold llama3.2 on their GPU (every k-th one).
SHAPES = {"a third hold the model": 3, "all hold the model": 1}


def fleet(n: int, resident_every: int = 3) -> list[BackendState]:
    """``n`` healthy backends in a varied, realistic state (deterministic); every
    ``resident_every``-th one holds llama3.2 on its GPU."""
    out = []
    for i in range(n):
        b = BackendState(id=f"b{i:03d}", url=f"http://127.0.0.1:{20000 + i}", max_concurrent=4)
        b.healthy = b.probed = True
        b.models = set(MODELS)
        b.model_names = list(MODELS)
        b.model_sizes = dict(MODELS)
        holds = i % resident_every == 0
        if holds:
            size = MODELS[KEY]
            b.resident[KEY] = {"name": KEY, "size": size, "size_vram": size}
        b.vram_total_bytes = 24 * GIB
        b.vram_free_bytes = (24 - 2 * holds - i % 5) * GIB
        b.in_flight = i % 3  # below max_concurrent: every backend has a free slot
        b.total_requests = 100 + i
        b.ttft.observe(0.05 + (i % 7) / 100)
        for k in range(20):
            b.probe_history.append(k % 10 != 0 or i % 2 == 0)
        for k in range(50):
            b.add_outcome(float(k), k % 25 != 0)
        out.append(b)
    return out


def _summary(ns: list[int]) -> dict[str, float]:
    us = [v / 1000 for v in ns]
    return {"p50_us": percentile(us, 50), "p99_us": percentile(us, 99), "calls": len(us)}


def time_pick(router: Router, iterations: int) -> dict[str, float]:
    clock = time.perf_counter_ns
    pick = router.pick
    times = []
    for _ in range(iterations):
        t0 = clock()
        pick(MODEL, KEY, "generate")
        times.append(clock() - t0)
    return _summary(times)


async def time_acquire(admission: Admission, iterations: int) -> dict[str, float]:
    clock = time.perf_counter_ns
    release = admission.release
    times = []
    for _ in range(iterations):
        t0 = clock()
        backend = await admission.acquire(MODEL, KEY, "generate")
        release(backend, KEY)
        times.append(clock() - t0)
    return _summary(times)


def measure(n: int, shape: str, strategy: str, iterations: int) -> dict[str, Any]:
    """pick and acquire+release timings for one fleet size, shape and strategy."""
    registry = BackendRegistry(fleet(n, SHAPES[shape]))
    registry.refresh_models()
    router = Router(registry, BalancerSettings(strategy=strategy))
    admission = Admission(router, QueueSettings(), Metrics())
    warm = max(20, iterations // 5)
    gc.collect()
    time_pick(router, warm)
    pick = time_pick(router, iterations)
    acquire = asyncio.run(_acquire_twice(admission, warm, iterations))
    return {"backends": n, "shape": shape, "strategy": strategy, "pick": pick, "acquire": acquire}


async def _acquire_twice(admission: Admission, warm: int, iterations: int) -> dict[str, float]:
    await time_acquire(admission, warm)
    return await time_acquire(admission, iterations)


def run(many: int, iterations: int) -> list[dict[str, Any]]:
    """Every strategy: two backends, and ``many`` of each shape."""
    configs = [(2, "a third hold the model")] + [(many, shape) for shape in SHAPES]
    return [
        measure(n, shape, strategy, iterations)
        for n, shape in configs
        for strategy in strategy_names()
    ]
