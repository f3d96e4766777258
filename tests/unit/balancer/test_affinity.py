"""Model inventory, hot-model affinity with bounded load, cold placement and conversations."""

from __future__ import annotations

from collections import Counter

from corral.balancer.routing import Router
from corral.balancer.sessions import SessionMap, session_key
from corral.config import BalancerSettings
from corral.fleet import inventory
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model
from corral.metrics import Metrics
from tests.helpers import FakeClock, backend, counter, loaded

GB = 10**9


def router(*backends: BackendState, **kw: object) -> tuple[Router, Metrics]:
    metrics = Metrics()
    settings = BalancerSettings(**kw)  # type: ignore[arg-type]
    return Router(BackendRegistry(backends), settings, metrics=metrics), metrics


def pick(r: Router, model: str = "m", session: str | None = None) -> BackendState:
    chosen = r.pick(model, normalize_model(model), "generate", (), session)
    assert chosen is not None
    return chosen


# Ollama's GPU/CPU rule -----------------------------------------------------------------------


def test_residency_follows_ollamas_ps_rule() -> None:
    """size_vram == size: GPU; 0: CPU; in between: partial; nonsense: unknown."""
    assert inventory.residency(5 * GB, 5 * GB) == "gpu"
    assert inventory.residency(5 * GB, 0) == "cpu"
    assert inventory.residency(5 * GB, 3 * GB) == "partial"
    assert inventory.residency(5 * GB, 6 * GB) is None
    assert inventory.residency(0, 0) == "cpu"
    assert inventory.residency(None, 1) is None


def test_update_reads_tags_and_ps_and_clears_loading_marks() -> None:
    """Installed names, sizes and resident models come from /api/tags and /api/ps; a loading
    mark ends when /api/ps lists the model, or after its TTL."""
    b = BackendState(id="a", url="http://127.0.0.1:1")
    tags = {"models": [{"name": "llama3.2:latest", "size": 2 * GB}, {"name": "qwen2.5:7b"}]}
    ps = {"models": [{"name": "llama3.2:latest", "size": 3 * GB, "size_vram": 1 * GB}]}
    b.loading = {"llama3.2:latest": 0.0, "qwen2.5:7b": 0.0, "old:latest": -500.0}
    inventory.update(b, tags, ps, now=1.0)
    assert b.models == {"llama3.2:latest", "qwen2.5:7b"}
    assert b.model_sizes == {"llama3.2:latest": 2 * GB}
    assert inventory.where(b, "llama3.2:latest") == "partial"
    assert b.loading == {"qwen2.5:7b": 0.0}  # listed now: done; too old: dropped


def test_models_view_lists_each_model_per_backend() -> None:
    a, b = loaded(backend("a", "m", "n"), "m"), backend("b", "m")
    b.resident["m:latest"] = {"name": "m:latest", "size": 4 * GB, "size_vram": 0}
    models = inventory.models_view(BackendRegistry([a, b]))
    view = {normalize_model(m["name"]): m["backends"] for m in models}
    assert view["m:latest"]["a"]["resident"] == "gpu"
    assert view["m:latest"]["b"]["resident"] == "cpu"
    assert view["n:latest"] == {
        "a": {
            "installed": True,
            "resident": None,
            "loading": False,
            "size": None,
            "size_vram": None,
            "expires_at": None,
            "context_length": None,
        }
    }


# Hot-model affinity -------------------------------------------------------------------------


def test_a_loaded_model_stays_on_its_backend_and_cold_loads_are_counted() -> None:
    """Requests follow the model; the first request for a cold model marks it loading there,
    so the next ones follow instead of loading it again elsewhere."""
    a, b, c = backend("a", "m", "n"), loaded(backend("b", "m", "n"), "m"), backend("c", "m", "n")
    r, metrics = router(a, b, c)
    assert Counter(pick(r).id for _ in range(20)) == Counter(b=20)
    assert counter(metrics, "corral_cold_loads_avoided_total", "b") == 20
    first = pick(r, "n")
    assert all(pick(r, "n") is first for _ in range(10))
    assert counter(metrics, "corral_cold_loads_total", first.id) == 1
    assert "n:latest" in first.loading


def test_bounded_load_among_the_backends_holding_the_model() -> None:
    """Of two backends holding the model, the busier one keeps requests up to 2 more in flight
    than the other; beyond that (and 1.5 times its load) they go to the other holder."""
    hot = loaded(backend("hot", "m", max_concurrent=4), "m")
    warm = loaded(backend("warm", "m", max_concurrent=4), "m")
    r, _ = router(hot, warm, strategy="round_robin")
    warm.in_flight = 0
    hot.in_flight = 3
    assert all(pick(r) is warm for _ in range(5))
    hot.in_flight = 2
    assert {pick(r).id for _ in range(30)} == {"hot", "warm"}


def test_a_free_holder_is_used_and_a_full_one_is_waited_for() -> None:
    """A holder with a free slot takes the request however busy it is (a cold load elsewhere
    would cost more); a full holder is waited for rather than loading a copy on one burst."""
    hot = loaded(backend("hot", "m", max_concurrent=4), "m")
    cold = backend("cold", "m", max_concurrent=4)
    r, _ = router(hot, cold)
    hot.in_flight = 3
    assert pick(r) is hot
    hot.in_flight = 4
    assert r.pick("m", "m:latest", "generate") is None
    assert cold.loading == {}


def test_spill_bound_is_configurable() -> None:
    hot = loaded(backend("hot", "m", max_concurrent=8), "m")
    warm = loaded(backend("warm", "m", max_concurrent=8), "m")
    r, _ = router(hot, warm, strategy="round_robin", affinity_spill_abs=5)
    hot.in_flight = 5
    assert {pick(r).id for _ in range(30)} == {"hot", "warm"}
    hot.in_flight = 6
    assert all(pick(r) is warm for _ in range(10))


def test_gpu_resident_beats_partial_and_cpu_resident() -> None:
    """All on GPU first, then split with the CPU; a copy running on the CPU attracts nothing."""
    gpu, part, cpu = backend("gpu", "m"), backend("part", "m"), backend("cpu", "m")
    part.resident["m:latest"] = {"size": 4 * GB, "size_vram": 2 * GB}
    cpu.resident["m:latest"] = {"size": 4 * GB, "size_vram": 0}
    r, _ = router(part, cpu)
    assert all(pick(r) is part for _ in range(5))
    loaded(gpu, "m")
    r, _ = router(gpu, part, cpu)
    assert all(pick(r) is gpu for _ in range(5))


def test_cold_model_goes_to_the_gpu_with_most_free_memory() -> None:
    """Loaded nowhere: the backend whose GPU has the most free VRAM takes it."""
    a, b, c = backend("a", "m"), backend("b", "m"), backend("c", "m")
    a.vram_free_bytes, b.vram_free_bytes, c.vram_free_bytes = 10 * GB, 40 * GB, 20 * GB
    for x in (a, b, c):
        x.vram_total_bytes = 80 * GB
        x.model_sizes = {"m:latest": 5 * GB}
    r, _ = router(a, b, c)
    assert pick(r) is b


def test_affinity_off_leaves_it_to_the_strategy() -> None:
    a, b = loaded(backend("a", "m"), "m"), backend("b", "m")
    r, _ = router(a, b, model_affinity=False, strategy="round_robin")
    assert Counter(pick(r).id for _ in range(10)) == Counter(a=5, b=5)


def test_show_loads_nothing_and_marks_nothing() -> None:
    """/api/show reads metadata only: no loading mark, no cold-load count."""
    a = backend("a", "m")
    r, metrics = router(a, backend("b", "m"))
    r.pick("m", "m:latest", "show")
    assert a.loading == {}
    assert counter(metrics, "corral_cold_loads_total", "a") == 0


# Conversations ---------------------------------------------------------------------------------


def test_session_key_is_system_plus_first_user_turn() -> None:
    """Every turn of one chat has the same key; another chat, or a header, has its own."""
    turn1 = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    }
    turn2 = {
        "messages": [
            *turn1["messages"],
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"},
        ]
    }
    other = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]
    }
    k1 = session_key(None, "chat", turn1)
    assert k1 is not None
    assert k1 == session_key(None, "chat", turn2) == session_key(None, "v1_chat", turn2)
    assert k1 != session_key(None, "chat", other)
    assert session_key("abc", "generate", {}) == "h:abc"
    assert session_key(None, "generate", {"prompt": "hi"}) is None
    assert session_key(None, "chat", {"messages": [{"role": "system", "content": "x"}]}) is None
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert session_key(None, "v1_chat", parts) is not None


def test_conversation_sticks_to_its_backend_while_not_overloaded() -> None:
    """With the model everywhere, round robin would alternate; a conversation stays put."""
    a, b = loaded(backend("a", "m"), "m"), loaded(backend("b", "m"), "m")
    r, _ = router(a, b, strategy="round_robin")
    first = pick(r, session="c:1")
    assert all(pick(r, session="c:1") is first for _ in range(6))
    other = next(x for x in (a, b) if x is not first)
    assert pick(r, session="c:2") is other  # a new conversation: the strategy's turn
    first.in_flight = 3
    assert pick(r, session="c:1") is other  # overloaded: the conversation moves
    assert pick(r, session="c:1") is other  # ... and stays where it went


def test_session_map_is_bounded_and_forgets() -> None:
    clock = FakeClock()
    sessions = SessionMap(max_size=2, ttl_s=10, clock=clock)
    sessions.put("x", "a")
    sessions.put("y", "b")
    sessions.put("z", "c")
    assert (sessions.get("x"), sessions.get("y"), len(sessions)) == (None, "b", 2)
    clock.now += 11
    assert sessions.get("y") is None


def test_no_copy_that_would_evict_while_the_holder_has_a_slot() -> None:
    """The busy holder keeps the model while it has a free slot, even when another GPU has
    room; when it is full, a GPU that would have to push part of the model to the CPU gets
    no copy: the request waits for the holder."""
    hot = loaded(backend("hot", "m", max_concurrent=4), "m")
    full = backend("full", "m", max_concurrent=4)
    roomy = backend("roomy", "m", max_concurrent=4)
    for b, free in ((hot, 1), (full, 1), (roomy, 20)):
        b.vram_total_bytes, b.vram_free_bytes = 24 * GB, free * GB
        b.model_sizes = {"m:latest": 5 * GB}
    r, _ = router(hot, full, roomy)
    hot.in_flight = 3
    assert all(pick(r) is hot for _ in range(5))
    hot.in_flight = 4
    r, _ = router(hot, full)
    assert r.pick("m", "m:latest", "generate") is None
