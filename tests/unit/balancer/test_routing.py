"""Router filters, affinity, fallback, admission queue and passive health, without HTTP."""

from __future__ import annotations

import asyncio

import pytest

from corral.balancer.admission import Admission
from corral.balancer.routing import Router
from corral.config import BalancerSettings, HealthSettings, QueueSettings, TimeoutSettings
from corral.errors import ModelNotFoundError, NoBackendError
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model
from corral.fleet.health import HealthChecker
from corral.metrics import Metrics
from corral.upstream import Upstream
from tests.helpers import FakeClock, backend, loaded


def router(*backends: BackendState, strategy: str = "least_connections", **kw: object) -> Router:
    registry = BackendRegistry(backends)
    return Router(registry, BalancerSettings(strategy=strategy, **kw))  # type: ignore[arg-type]


def test_model_names_normalize_like_ollama() -> None:
    """llama3.2 and LLAMA3.2:latest are one model; tags and namespaces are kept."""
    assert normalize_model("llama3.2") == "llama3.2:latest"
    assert normalize_model("LLAMA3.2:latest") == "llama3.2:latest"
    assert normalize_model("user/m:7b") == "user/m:7b"
    assert normalize_model("host:5000/user/m") == "host:5000/user/m:latest"


def test_only_backends_with_the_model_are_chosen() -> None:
    """A request for a model goes only to backends whose /api/tags list it."""
    r = router(backend("a", "llama3.2"), backend("b", "qwen2.5:7b"))
    for _ in range(20):
        chosen = r.pick("qwen2.5:7b", normalize_model("qwen2.5:7b"), "chat")
        assert chosen is not None
        assert chosen.id == "b"


def test_unknown_model_is_ollamas_404() -> None:
    """No backend lists the model: ModelNotFoundError with Ollama's text."""
    r = router(backend("a", "llama3.2"))
    with pytest.raises(ModelNotFoundError, match="model 'nope' not found"):
        r.pick("nope", normalize_model("nope"), "generate")


def test_down_backend_with_the_model_is_503_not_404() -> None:
    """The only backend with the model is down: 503 (try later), not 404."""
    down = backend("a", "llama3.2")
    down.healthy = False
    r = router(down, backend("b", "qwen2.5:7b"))
    with pytest.raises(NoBackendError):
        r.pick("llama3.2", normalize_model("llama3.2"), "generate")


def test_draining_and_ejected_backends_take_nothing_new() -> None:
    """Draining and ejected backends are skipped."""
    a, b, c = backend("a", "m"), backend("b", "m"), backend("c", "m")
    b.draining = True
    c.ejected_until = float("inf")
    r = router(a, b, c)
    assert {r.pick("m", "m:latest", "x").id for _ in range(30)} == {"a"}  # type: ignore[union-attr]


def test_full_backends_yield_none() -> None:
    """Every backend full: None (the request waits in the queue)."""
    a = backend("a", "m", max_concurrent=1)
    r = router(a, backend("b", "m", max_concurrent=1))
    a_or_b = {r.pick("m", "m:latest", "x").id for _ in range(2)}  # type: ignore[union-attr]
    assert a_or_b <= {"a", "b"}
    for b in r.registry.all():
        b.in_flight = 1
    assert r.pick("m", "m:latest", "x") is None


def test_fallback_only_when_every_gpu_backend_is_down_or_full() -> None:
    """A CPU fallback gets nothing while a GPU backend has a slot; it serves when all are full
    or down, and the GPU backends win again as soon as one has room."""
    gpu0 = backend("gpu0", "m", max_concurrent=1)
    gpu1 = backend("gpu1", "m", max_concurrent=1)
    cpu = backend("cpu", "m", fallback=True, max_concurrent=8)
    r = router(gpu0, gpu1, cpu, model_affinity=False)
    picks = {r.pick("m", "m:latest", "x").id for _ in range(20)}  # type: ignore[union-attr]
    assert picks <= {"gpu0", "gpu1"}
    gpu0.in_flight = 1
    assert all(r.pick("m", "m:latest", "x") is gpu1 for _ in range(10))
    gpu1.in_flight = 1
    assert r.pick("m", "m:latest", "x") is cpu  # every GPU backend full
    gpu1.in_flight = 0
    gpu1.healthy = False
    assert r.pick("m", "m:latest", "x") is cpu  # one full, one down
    gpu0.in_flight = 0
    assert r.pick("m", "m:latest", "x") is gpu0
    cpu.in_flight = 8
    gpu0.in_flight = 1
    assert r.pick("m", "m:latest", "x") is None  # nothing free anywhere: queue


def test_affinity_keeps_a_free_holder_and_waits_for_a_full_one() -> None:
    """A backend with the model loaded wins while it has a slot; when it is full, the request
    waits for it rather than start a cold load that costs more than the wait."""
    hot = backend("hot", "m", max_concurrent=4)
    cold = backend("cold", "m", max_concurrent=4)
    loaded(hot, "m")
    r = router(hot, cold)
    assert all(r.pick("m", "m:latest", "x") is hot for _ in range(20))
    hot.in_flight = 3
    assert r.pick("m", "m:latest", "x") is hot
    hot.in_flight = 4
    assert r.pick("m", "m:latest", "x") is None


def test_strategy_switch_keeps_working() -> None:
    """Switching strategy at runtime changes the choice rule immediately."""
    a, b = loaded(backend("a", "m"), "m"), loaded(backend("b", "m"), "m")
    r = router(a, b, strategy="round_robin")
    picks = [r.pick("m", "m:latest", "x").id for _ in range(4)]  # type: ignore[union-attr]
    assert picks.count("a") == 2
    r.set_strategy("least_connections")
    a.in_flight = 3
    assert r.pick("m", "m:latest", "x") is b
    assert r.strategy_name == "least_connections"


async def test_queue_waits_for_a_slot_then_dispatches() -> None:
    """When every backend is full the request waits and gets the slot as soon as it frees."""
    a = backend("a", "m", max_concurrent=1)
    r = router(a)
    adm = Admission(r, QueueSettings(max_size=4, timeout_s=5), Metrics())
    async with r.registry.lease(a):
        waiter = asyncio.create_task(adm.acquire("m", "m:latest", "x"))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        assert adm.queued == 1
    got = await asyncio.wait_for(waiter, 1)
    assert got is a
    assert a.in_flight == 1, "the slot is reserved for the waiter before it wakes"
    assert adm.queued == 0


async def test_queue_full_and_timeout_are_503() -> None:
    """Past queue.max_size or queue.timeout_s: NoBackendError with Retry-After ≥ 1."""
    a = backend("a", "m", max_concurrent=1)
    a.in_flight = 1
    r = router(a)
    adm = Admission(r, QueueSettings(max_size=0, timeout_s=0.05), Metrics())
    with pytest.raises(NoBackendError) as info:
        await adm.acquire("m", "m:latest", "x")
    assert info.value.retry_after_s >= 1
    adm.settings = QueueSettings(max_size=5, timeout_s=0.05)
    with pytest.raises(NoBackendError, match="busy"):
        await adm.acquire("m", "m:latest", "x")


def checker(*backends: BackendState, clock: FakeClock, **kw: object) -> HealthChecker:
    return HealthChecker(
        BackendRegistry(backends, clock=clock),
        Upstream(TimeoutSettings()),
        HealthSettings(**kw),  # type: ignore[arg-type]
        Metrics(),
        clock=clock,
    )


def test_fall_and_rise() -> None:
    """Down after `fall` failed probes, up after `rise` good ones; transitions counted."""
    clock = FakeClock()
    b = backend("a")
    hc = checker(b, clock=clock, fall=3, rise=2)
    hc.record_probe(b, False)
    hc.record_probe(b, False)
    assert b.healthy
    hc.record_probe(b, False)
    assert not b.healthy
    hc.record_probe(b, True)
    assert not b.healthy
    hc.record_probe(b, True)
    assert b.healthy
    value = hc.metrics.transitions.labels(backend="a", to="down")._value.get()
    assert value == 1


def test_first_probe_decides_at_once() -> None:
    """A backend never seen up is down after its first failed probe (no fall wait)."""
    clock = FakeClock()
    b = BackendState(id="a", url="http://127.0.0.1:1")
    hc = checker(b, clock=clock)
    hc.record_probe(b, False)
    assert not b.healthy
    assert b.probed


def test_passive_ejection_on_transport_errors_and_error_rate() -> None:
    """Consecutive transport errors or a high error rate eject for a growing time."""
    clock = FakeClock()
    b = backend("a")
    hc = checker(b, clock=clock, consecutive_errors=3, ejection_s=10, max_ejection_s=25)
    for _ in range(3):
        hc.record_result(b, False, transport=True)
    assert b.is_ejected(clock.now)
    assert b.ejected_until == clock.now + 10
    clock.now += 11
    assert not b.is_ejected(clock.now)
    for _ in range(3):
        hc.record_result(b, False, transport=True)
    assert b.ejected_until == clock.now + 20
    clock.now += 21
    for _ in range(6):
        hc.record_result(b, True)
    for _ in range(7):
        hc.record_result(b, False)  # 5xx: counts toward the rate only
    assert b.is_ejected(clock.now)


def test_successes_do_not_eject() -> None:
    """A busy but healthy backend is never ejected."""
    clock = FakeClock()
    b = backend("a")
    hc = checker(b, clock=clock)
    for _ in range(100):
        hc.record_result(b, True)
    assert not b.is_ejected(clock.now)


def test_success_rate_tracks_the_last_thousand_outcomes() -> None:
    """The score strategy's success rate covers recent requests and forgets old failures."""
    b = backend("a")
    for _ in range(500):
        b.add_outcome(0.0, False)
    assert b.candidate(1.0).success_rate == 0.0
    for _ in range(750):
        b.add_outcome(1.0, True)
    assert b.candidate(1.0).success_rate == 0.75
    for _ in range(250):
        b.add_outcome(2.0, True)
    assert b.candidate(1.0).success_rate == 1.0


def test_reachable_again_lifts_a_transport_ejection_only() -> None:
    """A backend ejected for being unreachable returns on a good probe; one ejected for 5xx not."""
    clock = FakeClock()
    b = backend("a")
    hc = checker(b, clock=clock, consecutive_errors=3, error_min_requests=3)
    for _ in range(3):
        hc.record_result(b, False, transport=True)
    assert b.is_ejected(clock.now)
    hc.record_probe(b, True, started=clock.now - 1)  # began before the ejection: no say
    assert b.is_ejected(clock.now)
    hc.record_probe(b, True, started=clock.now)
    assert b.available(clock.now)
    clock.now += 100
    for _ in range(4):
        hc.record_result(b, False)  # answered 500s: a live but failing backend
    assert b.is_ejected(clock.now)
    hc.record_probe(b, True, started=clock.now)
    assert b.is_ejected(clock.now)


def test_retry_budget_holds_under_a_storm() -> None:
    """1000 failing requests: retries stay near 20% of them plus the per-second floor."""
    from corral.proxy.forward import RetryBudget

    clock = FakeClock()
    budget = RetryBudget(0.2, 3, clock=clock)
    retries = 0
    for _ in range(1000):
        clock.now += 0.001  # 1000 requests in one second
        budget.deposit()
        # Each request would like two retries (max_attempts = 3).
        retries += budget.withdraw() + budget.withdraw()
    assert retries <= 0.2 * 1000 + 3 * 1 + budget.capacity
    assert retries >= 150


def test_retry_budget_refills_for_a_quiet_service() -> None:
    """With little traffic the per-second floor still allows the occasional retry."""
    from corral.proxy.forward import RetryBudget

    clock = FakeClock()
    budget = RetryBudget(0.2, 1, clock=clock)
    while budget.withdraw():
        pass
    assert not budget.withdraw()
    clock.now += 1.0
    assert budget.withdraw()
    assert not budget.withdraw()
