"""Placement by cost: wait for a holder or load a copy, what a load evicts and stalls, demand
over a window, context lengths and conversations (balancer.costs, balancer.demand, the router)."""

from __future__ import annotations

from typing import Any

import pytest

from corral.balancer.costs import holding
from corral.balancer.demand import Demand, Level
from corral.balancer.replicas import Replicator
from corral.balancer.routing import Router
from corral.config import BalancerSettings, PlacementSettings
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model
from corral.metrics import Metrics
from tests.helpers import FakeClock, backend, counter

GB = 10**9


def gpu(bid: str, total_gb: float, *resident: tuple[str, float], **kw: object) -> BackendState:
    """A backend with every model of the test installed and ``resident`` (name, GB) loaded."""
    b = backend(bid, "m", "n", "o", "p", "big", **kw)
    b.vram_total_bytes = int(total_gb * GB)
    used = 0
    for name, size_gb in resident:
        size = int(size_gb * GB)
        b.resident[normalize_model(name)] = {"name": name, "size": size, "size_vram": size}
        used += size
    b.vram_free_bytes = b.vram_total_bytes - used
    b.model_sizes = {
        "m:latest": 14 * GB,
        "n:latest": 9 * GB,
        "o:latest": 16 * GB,
        "p:latest": 5 * GB,
        "big:latest": 40 * GB,
    }
    return b


def fleet(*backends: BackendState, **kw: object) -> tuple[Router, FakeClock, Metrics]:
    clock = FakeClock()
    metrics = Metrics()
    settings = BalancerSettings(**kw)  # type: ignore[arg-type]
    r = Router(BackendRegistry(backends), settings, clock=clock, metrics=metrics)
    return r, clock, metrics


def serve(r: Router, b: BackendState, model: str, n: int = 1) -> None:
    """``n`` requests for ``model`` are in flight on ``b`` (as the forwarder reports them)."""
    for _ in range(n):
        r.demand.start(b.id, normalize_model(model))
        b.in_flight += 1


def used(r: Router, backend_id: str, model: str) -> None:
    """One request for ``model`` went to ``backend_id`` and ended (it is in demand there now)."""
    r.demand.start(backend_id, model)
    r.demand.end(backend_id, model, 1.0)


def pick(r: Router, model: str, **kw: object) -> BackendState | None:
    return r.pick(model, normalize_model(model), "chat", **kw)  # type: ignore[arg-type]


# Demand ---------------------------------------------------------------------------------------


def test_level_is_a_time_average_over_the_window() -> None:
    """A level held for one window reads about 63% of it; a short burst reads its share."""
    level = Level(0.0)
    level.add(0.0, 30.0, 4)
    assert level.read(30.0, 30.0) == pytest.approx(4 * (1 - 2.718281828**-1), rel=1e-6)
    burst = Level(0.0)
    burst.add(0.0, 30.0, 10)
    burst.add(1.0, 30.0, -10)
    assert burst.read(1.0, 30.0) < 0.4


def test_demand_learns_service_time_and_load_speed() -> None:
    """Slot time and load speed come from what requests reported; defaults until then."""
    clock = FakeClock()
    demand = Demand(window_s=30, clock=clock)
    assert demand.load_s("a", 10 * GB) == pytest.approx(0.5 + 10 / 2)
    demand.observe_load("a", 10 * GB, 10.5)  # 1 GB/s
    assert demand.load_s("a", 10 * GB) == pytest.approx(10.5)
    assert demand.load_s("b", 10 * GB) == pytest.approx(10.5)  # untried: the fleet's speed
    demand.observe_load("b", 10 * GB, 5.5)  # 2 GB/s
    assert demand.load_s("c", 10 * GB) == pytest.approx(0.5 + 10 / 1.5)
    demand.start("a", "m")
    clock.now += 3
    demand.end("a", "m", 3.0)
    assert demand.service_s("a", "m") == pytest.approx(3.0)
    assert demand.service_s("b", "m") == pytest.approx(3.0)  # the model's, elsewhere
    assert demand.in_demand("a", "m")
    clock.now += 31
    assert not demand.in_demand("a", "m")


# Wait for a holder, or load a copy ----------------------------------------------------------


def test_a_burst_does_not_start_a_load_that_evicts_a_model_in_demand() -> None:
    """The holder of m is full and a burst queues for it: the only other GPU would have to
    evict a model, perhaps n, which its own traffic is using (Ollama picks which), so the
    burst waits for the holder."""
    holder = gpu("holder", 48, ("m", 14))
    other = gpu("other", 24, ("n", 9), ("p", 5))
    r, clock, _ = fleet(holder, other)
    serve(r, holder, "m", 4)
    r.demand.start(other.id, "n:latest")
    r.demand.end(other.id, "n:latest", 2.0)  # n was used there a moment ago
    r.demand.queue("m:latest", 12)
    clock.now += 1
    assert pick(r, "m") is None
    assert other.loading == {}


def test_a_copy_goes_to_free_room_only_when_the_wait_is_far_longer_than_the_load() -> None:
    """The holder of m is full. Ten requests queued: the wait (about 13.75 s) is longer than a
    14 GB load (7.5 s) but not three times: one burst, so they wait. Thirty queued (about
    38.75 s): the copy is loaded on the GPU with free room, where it evicts nothing."""
    holder = gpu("holder", 48, ("m", 14))
    roomy = gpu("roomy", 48)
    r, _, metrics = fleet(holder, roomy)
    serve(r, holder, "m", 4)
    r.demand.queue("m:latest", 10)
    assert pick(r, "m") is None
    r.demand.queue("m:latest", 20)
    assert pick(r, "m") is roomy
    assert "m:latest" in roomy.loading
    assert counter(metrics, "corral_cold_loads_total", "roomy") == 1


def test_a_copy_follows_demand_over_the_window() -> None:
    """Ten queued for the full holder: not on the burst, but once the requests for m have
    exceeded the holder's slots over the window, a copy goes to the GPU with room."""
    holder = gpu("holder", 48, ("m", 14))
    roomy = gpu("roomy", 48)
    r, clock, _ = fleet(holder, roomy)
    serve(r, holder, "m", 4)
    r.demand.queue("m:latest", 10)
    assert pick(r, "m") is None
    clock.now += 45
    assert pick(r, "m") is roomy


def test_a_copy_that_evicts_an_idle_model_waits_for_demand_over_the_window() -> None:
    """The only other GPU must unload n (idle for minutes) to take m: not on a burst, but once
    the requests for m have exceeded the holder's slots over the window."""
    holder = gpu("holder", 48, ("m", 14))
    other = gpu("other", 24, ("n", 9), ("p", 5))
    r, clock, _ = fleet(holder, other)
    used(r, "other", "n:latest")
    clock.now += 300
    serve(r, holder, "m", 4)
    r.demand.queue("m:latest", 10)
    assert pick(r, "m") is None  # a burst: not yet
    clock.now += 45  # the holder full and ten waiting, for longer than the window
    assert pick(r, "m") is other


def test_a_fourth_model_waits_for_a_holder_rather_than_a_full_ollama() -> None:
    """The Ollama with a free slot holds three busy models (its limit): loading a fourth there
    waits for one to go idle and stalls it, while the holder of m frees a slot sooner."""
    holder = gpu("holder", 80, ("m", 14))
    crowded = gpu("crowded", 80, ("n", 9), ("o", 16), ("p", 5), max_concurrent=8)
    r, clock, _ = fleet(holder, crowded)
    serve(r, holder, "m", 4)
    for model in ("n", "o", "p"):
        serve(r, crowded, model)
    r.demand.queue("m:latest", 3)
    clock.now += 60  # sustained: a copy would be welcome where it costs less than the wait
    assert pick(r, "m") is None
    cost = r.costs.load(crowded, "m:latest", 14 * GB, clock.now, crowded.max_loaded_models)
    assert cost.blocked
    assert cost.evicts_in_demand
    wait = r.costs.holder_wait_s([holder], "m:latest", clock.now)
    assert wait < r.demand.load_s("crowded", 14 * GB)


def test_a_limit_of_loaded_models_counts_like_memory() -> None:
    """With room in VRAM but three models loaded, a fourth evicts one (max_loaded_models); with
    the limit raised it evicts nothing."""
    b = gpu("b", 80, ("n", 9), ("o", 16), ("p", 5))
    r, clock, _ = fleet(b)
    cost = r.costs.load(b, "m:latest", 14 * GB, clock.now, 3)
    assert len(cost.evicts) == 1
    assert not cost.blocked
    cost = r.costs.load(b, "m:latest", 14 * GB, clock.now, 4)
    assert cost.evicts == ()


def test_a_40gb_model_goes_where_it_fits_beside_what_is_in_demand() -> None:
    """Held nowhere: the 40 GB model skips the 24 GB GPU (too small) and the 48 GB one (it
    would evict m, in use there) for the 80 GB GPU, where it fits beside o."""
    h100 = gpu("h100", 80, ("o", 16))
    l40s = gpu("l40s", 48, ("m", 14))
    a10 = gpu("a10", 24)
    r, _, _ = fleet(h100, l40s, a10)
    serve(r, h100, "o")
    serve(r, l40s, "m")
    assert pick(r, "big") is h100


def test_a_model_loaded_nowhere_goes_to_an_idle_gpu_rather_than_a_busy_one() -> None:
    """The bigger GPU has room but has been busy with o all along: the new model goes to the
    idle one, where its requests will not queue behind o's."""
    h100 = gpu("h100", 80, ("o", 16))
    l40s = gpu("l40s", 48)
    r, clock, _ = fleet(h100, l40s)
    serve(r, h100, "o", 3)
    clock.now += 60
    assert pick(r, "m") is l40s


def test_a_cold_load_avoids_a_gpu_already_loading_another_model() -> None:
    """Ollama loads one model at a time: a cold request sent where another load is under way
    waits for it, so the model goes to an equal GPU that is not loading."""
    a = gpu("a", 48)
    b = gpu("b", 48)
    r, clock, _ = fleet(a, b)
    b.loading["o:latest"] = clock.now
    assert r.costs.stall_s(b, "m:latest", clock.now) == pytest.approx(0.5 + 16 / 2)
    assert pick(r, "m") is a


def test_fallback_serves_when_every_gpu_backend_is_full_with_affinity_on() -> None:
    """A CPU-only fallback is the last resort: it takes the request when every GPU is full."""
    g = gpu("g", 48, ("m", 14))
    cpu = backend("cpu", "m", fallback=True)
    r, _, _ = fleet(g, cpu)
    assert pick(r, "m") is g
    g.in_flight = g.max_concurrent
    assert pick(r, "m") is cpu


# Context length and conversations ------------------------------------------------------------


def test_num_ctx_mismatch_prefers_a_matching_runner_and_counts() -> None:
    """A runner with another context length would reload for the request: the backend whose
    runner matches takes it (a reload avoided); with none matching, the reload is counted."""
    a = gpu("a", 48, ("m", 14))
    b = gpu("b", 48, ("m", 14))
    a.resident["m:latest"]["context_length"] = 4096
    b.resident["m:latest"]["context_length"] = 8192
    r, _, metrics = fleet(a, b)
    assert holding(a, "m:latest", 8192) == "other_ctx"
    assert all(pick(r, "m", num_ctx=8192) is b for _ in range(5))
    assert counter(metrics, "corral_context_reloads_avoided_total", "b") == 5
    assert pick(r, "m", num_ctx=4096) is a
    r, _, metrics = fleet(a)
    assert pick(r, "m", num_ctx=16384) is a
    assert counter(metrics, "corral_context_reloads_total", "a") == 1
    assert a.loaded_ctx["m:latest"] == 16384
    # Ollama may cap what was asked (the model's own limit): still this runner, no reload.
    assert holding(a, "m:latest", 16384) != "other_ctx"


def test_a_follow_up_turn_stays_with_its_cached_prompt() -> None:
    """Both GPUs hold the model and the other one is idler: the conversation's next turn still
    goes where its prompt is cached."""
    a = gpu("a", 48, ("m", 14))
    b = gpu("b", 48, ("m", 14))
    r, _, _ = fleet(a, b)
    first = pick(r, "m", session="c:1")
    assert first is not None
    first.in_flight = 2
    assert all(pick(r, "m", session="c:1") is first for _ in range(5))
    assert pick(r, "m", session="c:2") is not first  # another chat: least connections


# Demand-driven copies --------------------------------------------------------------------------


def replicator(r: Router, clock: FakeClock) -> tuple[Replicator, list[tuple[str, dict[str, Any]]]]:
    sent: list[tuple[str, dict[str, Any]]] = []

    async def send(url: str, body: dict[str, Any]) -> tuple[int, Any]:
        sent.append((url, body))
        return 200, {"done": True}

    async def refresh(b: BackendState) -> None:
        return None

    rep = Replicator(
        r.registry, r, PlacementSettings(), Metrics(), send=send, refresh=refresh, clock=clock
    )
    return rep, sent


async def test_a_copy_is_preloaded_on_an_idle_gpu_once_demand_exceeds_the_holders() -> None:
    """Nothing on a burst; once the holder of m has been full with requests waiting over the
    window, m is loaded on the idle GPU with room (Ollama's default keep-alive)."""
    holder = gpu("holder", 48, ("m", 14))
    idle = gpu("idle", 48)
    r, clock, _ = fleet(holder, idle)
    serve(r, holder, "m", 4)
    r.demand.queue("m:latest", 3)
    rep, sent = replicator(r, clock)
    assert await rep.run_pass() is None
    clock.now += 45
    assert await rep.run_pass() == ("m:latest", "idle")
    assert sent == [
        (
            "http://127.0.0.1:1/idle/api/generate",
            {"model": "m:latest", "prompt": "", "stream": False},
        )
    ]
    assert "m:latest" in idle.loading


async def test_a_copy_steers_the_eviction_and_never_evicts_what_is_in_demand() -> None:
    """The idle GPU holds n (unused for minutes) and o (in use a moment ago): corral unloads
    n itself, then loads m; were both in use, nothing is loaded."""
    holder = gpu("holder", 48, ("m", 14))
    idle = gpu("idle", 24, ("n", 9), ("o", 5))
    r, clock, _ = fleet(holder, idle)
    used(r, "idle", "n:latest")
    serve(r, holder, "m", 4)
    r.demand.queue("m:latest", 3)
    clock.now += 60
    used(r, "idle", "o:latest")
    rep, sent = replicator(r, clock)
    assert await rep.run_pass() == ("m:latest", "idle")
    assert [body for _, body in sent] == [
        {"model": "n", "prompt": "", "stream": False, "keep_alive": 0},
        {"model": "m:latest", "prompt": "", "stream": False},
    ]
    used(r, "idle", "n:latest")
    idle.loading.clear()
    sent.clear()
    assert await rep.run_pass() is None
    assert sent == []


async def test_a_model_in_demand_and_held_nowhere_is_loaded_back_ahead_of_its_requests() -> None:
    """m was used a moment ago and Ollama unloaded it: it is loaded again on an idle GPU."""
    a = gpu("a", 48)
    r, clock, _ = fleet(a)
    used(r, "a", "m:latest")
    rep, _ = replicator(r, clock)
    assert await rep.run_pass() == ("m:latest", "a")


async def test_no_copy_of_a_model_the_admin_just_unloaded() -> None:
    """An admin's unload stands: the model is not loaded back for ten minutes."""
    a = gpu("a", 48)
    r, clock, _ = fleet(a)
    used(r, "a", "m:latest")
    rep, _ = replicator(r, clock)
    rep.pause("m")
    assert await rep.run_pass() is None
    clock.now += 601
    used(r, "a", "m:latest")
    assert await rep.run_pass() == ("m:latest", "a")


def test_slots_are_per_model_as_ollamas_num_parallel() -> None:
    """max_concurrent is Ollama's OLLAMA_NUM_PARALLEL, which is per loaded model: a backend
    whose m runner is full still takes a request for n (its own runner), up to
    max_concurrent x max_loaded_models in all."""
    b = gpu("b", 80, ("m", 14), ("n", 9), ("o", 16))
    r, _, _ = fleet(b)
    serve(r, b, "m", 4)
    assert pick(r, "m") is None
    assert pick(r, "n") is b
    serve(r, b, "n", 4)
    serve(r, b, "o", 4)
    assert b.in_flight == 12
    assert pick(r, "p") is None


def test_a_copy_still_loading_waits_its_turn_behind_loaded_holders() -> None:
    """A loaded holder with a slot beats a copy still loading; with every loaded holder full,
    the loading copy takes the request only if its load ends before a loaded slot frees."""
    a = gpu("a", 48, ("m", 14))
    b = gpu("b", 48)
    r, clock, _ = fleet(a, b)
    b.loading["m:latest"] = clock.now  # a 14 GB load: about 7.5 s to go
    assert all(pick(r, "m") is a for _ in range(5))
    serve(r, a, "m", 4)
    assert pick(r, "m") is None  # a's next free slot (about 1.25 s) comes first
    clock.now += 7.0
    assert pick(r, "m") is b


def test_a_long_conversation_waits_for_its_cached_prompt_a_short_one_moves() -> None:
    """The chat's backend is full. With 30,000 tokens of context cached there, the next turn
    waits for its slot (about 1.25 s) rather than prefill it all elsewhere (about 15 s); with
    100 tokens it goes to the other backend holding the model at once."""
    a = gpu("a", 48, ("m", 14))
    b = gpu("b", 48, ("m", 14))
    r, _, _ = fleet(a, b)
    b.in_flight = 1  # the first turn goes to a (least connections)
    assert pick(r, "m", session="c:1") is a
    b.in_flight = 0
    serve(r, a, "m", 4)
    r.note_context("c:1", 30_000)
    assert pick(r, "m", session="c:1") is None
    r.note_context("c:1", 100)
    assert pick(r, "m", session="c:1") is b
