"""Placement without sockets: expiry parsing, LRU choice, room planning, and passes and admin
actions over a scripted fleet of fake Ollamas."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from corral.config import PlacementSettings, load_config
from corral.errors import ConfigError, UnknownBackendError
from corral.fleet import inventory
from corral.fleet.backends import BackendRegistry, BackendState
from corral.fleet.placement import NotInstalledError, PlacementManager, expiry, lru, plan_room
from corral.metrics import Metrics

GIB = 1024**3
NOW = 1_800_000_000.0


def stamp(seconds_from_now: float) -> str:
    """An /api/ps expires_at, in a +02:00 zone as Ollama writes local time."""
    zone = timezone(timedelta(hours=2))
    return datetime.fromtimestamp(NOW + seconds_from_now, zone).isoformat()


def backend(
    bid: str,
    free: int | None = None,
    resident: dict[str, tuple[int, int, float]] | None = None,
    installed: tuple[str, ...] = (),
    in_flight: int = 0,
) -> BackendState:
    """A healthy backend; ``resident``: key -> (size, size_vram, seconds until it expires)."""
    b = BackendState(id=bid, url=f"http://{bid}", healthy=True, probed=True, in_flight=in_flight)
    b.vram_free_bytes = free
    b.resident = {
        k: {"name": k, "size": s, "size_vram": v, "expires_at": stamp(t)}
        for k, (s, v, t) in (resident or {}).items()
    }
    b.models = set(installed) | set(b.resident)
    b.model_names = sorted(b.models)
    return b


# expires_at ----------------------------------------------------------------------------------


def test_expiry_reads_ollamas_local_rfc3339() -> None:
    """Nanoseconds, local offsets, Z and the year-2318 "forever" all parse; junk is None."""
    assert expiry({"expires_at": "2024-06-04T14:38:31.83753-07:00"}) == pytest.approx(
        datetime(2024, 6, 4, 21, 38, 31, 837530, tzinfo=UTC).timestamp()
    )
    nanos = expiry({"expires_at": "2024-06-04T14:38:31.837530123+02:00"})
    assert nanos == pytest.approx(datetime(2024, 6, 4, 12, 38, 31, 837530, tzinfo=UTC).timestamp())
    assert expiry({"expires_at": "2318-06-04T14:38:31Z"}) > NOW  # type: ignore[operator]
    assert expiry({"expires_at": "soon"}) is None
    assert expiry({}) is None


# LRU and room --------------------------------------------------------------------------------


def test_lru_orders_by_earliest_expiry_and_spares_what_it_must() -> None:
    """Earliest expires_at first; models in keep, models being loaded, CPU-only models (they
    free no VRAM) and unparseable expiries last or never."""
    b = backend(
        "a",
        resident={
            "new:latest": (GIB, GIB, 290),
            "old:latest": (GIB, GIB, 10),
            "mid:latest": (GIB, GIB, 100),
            "prio:latest": (GIB, GIB, 1),
            "oncpu:latest": (GIB, 0, 2),
            "loading:latest": (GIB, GIB, 3),
        },
    )
    b.resident["odd:latest"] = {"size": GIB, "size_vram": GIB, "expires_at": "?"}
    b.loading["loading:latest"] = time.monotonic()
    assert lru(b, {"prio:latest"}) == ["old:latest", "mid:latest", "new:latest", "odd:latest"]


def test_plan_prefers_room_then_idle_then_fewest_evictions() -> None:
    """A backend with room wins over evicting; among evictions an idle backend wins over a
    busy one, and only as many LRU models go as needed."""
    full_idle = backend(
        "idle", free=0, resident={"x:latest": (2 * GIB, 2 * GIB, 5), "y:latest": (GIB, GIB, 1)}
    )
    full_busy = backend("busy", free=0, resident={"z:latest": (4 * GIB, 4 * GIB, 1)}, in_flight=2)
    roomy = backend("roomy", free=3 * GIB)
    free = {b.id: b.vram_free_bytes for b in (full_idle, full_busy, roomy)}
    plan = plan_room([full_idle, full_busy, roomy], "p:latest", 3 * GIB, free, [])
    assert plan is not None
    assert (plan.backend.id, plan.evict) == ("roomy", ())
    plan = plan_room([full_busy, full_idle], "p:latest", 3 * GIB, free, [])
    assert plan is not None
    assert (plan.backend.id, plan.evict) == ("idle", ("y:latest", "x:latest"))
    plan = plan_room([full_busy, full_idle], "p:latest", GIB, free, [])
    assert plan is not None
    assert (plan.backend.id, plan.evict) == ("idle", ("y:latest",))


def test_plan_counts_the_models_own_vram_never_evicts_priority_and_needs_known_vram() -> None:
    """The backend holding the model partly frees its share when it reloads; a priority model
    is never evicted; unknown VRAM is never chosen."""
    part = backend("part", free=GIB, resident={"p:latest": (4 * GIB, 3 * GIB, 5)})
    plan = plan_room([part], "p:latest", 4 * GIB, {"part": GIB}, [], current=part)
    assert plan is not None
    assert (plan.backend.id, plan.evict) == ("part", ())
    guarded = backend("g", free=0, resident={"q:latest": (4 * GIB, 4 * GIB, 1)})
    assert plan_room([guarded], "p:latest", 4 * GIB, {"g": 0}, ["q:latest"]) is None
    unknown = backend("u", free=None)
    assert plan_room([unknown], "p:latest", GIB, {"u": None}, []) is None


# A scripted fleet ----------------------------------------------------------------------------


class Fleet:
    """Fake Ollamas behind ``send``: loads fill VRAM (partly when short), num_gpu 0 loads on
    CPU, keep_alive 0 unloads; ``refresh`` feeds /api/tags and /api/ps to the backend."""

    def __init__(self, vram: dict[str, int], installed: dict[str, int]) -> None:
        self.registry = BackendRegistry()
        self.vram = vram
        self.installed = installed
        self.loaded: dict[str, dict[str, dict[str, Any]]] = {bid: {} for bid in vram}
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.fail: set[str] = set()
        self.embedding: set[str] = set()
        self.tags: dict[str, set[str]] = {}  # models per backend (default: all of installed)
        for bid in vram:
            self.registry.add(BackendState(id=bid, url=f"http://{bid}", healthy=True, probed=True))

    def put(self, bid: str, model: str, vram: int | None = None, expires_in: float = 300) -> None:
        size = self.installed[model]
        self.loaded[bid][model] = {
            "name": model,
            "size": size,
            "size_vram": size if vram is None else vram,
            "expires_at": stamp(expires_in),
        }

    def free(self, bid: str) -> int:
        return self.vram[bid] - sum(m["size_vram"] for m in self.loaded[bid].values())

    async def send(self, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        bid, path = url.removeprefix("http://").split("/", 1)
        self.sent.append((bid, "/" + path, body))
        model = body["model"]
        if bid in self.fail:
            return 500, {"error": "llama runner process has terminated"}
        if path == "api/generate" and model in self.embedding:
            return 400, {"error": f'"{model}" does not support generate'}
        if body.get("keep_alive") == 0:
            self.loaded[bid].pop(model, None)
            return 200, {"done": True, "done_reason": "unload"}
        cpu = body.get("options", {}).get("num_gpu") == 0
        current = self.loaded[bid].pop(model, None)
        if current is not None and not cpu and current["size_vram"] == current["size"]:
            self.loaded[bid][model] = current  # loaded as asked already: no reload
        else:
            self.put(bid, model, 0 if cpu else min(self.installed[model], self.free(bid)))
        keep = body.get("keep_alive")
        self.loaded[bid][model]["expires_at"] = stamp(1e10 if keep == -1 else 300)
        return 200, {"done": True, "done_reason": "load"}

    async def refresh(self, b: BackendState) -> bool:
        names = self.tags.get(b.id, set(self.installed))
        tags = {"models": [{"name": m, "size": s} for m, s in self.installed.items() if m in names]}
        inventory.update(b, tags, {"models": list(self.loaded[b.id].values())})
        b.vram_free_bytes = self.free(b.id)
        return True

    def manager(self, priority: list[str], **settings: Any) -> PlacementManager:
        return PlacementManager(
            self.registry,
            PlacementSettings(priority_models=priority, **settings),
            Metrics(),
            send=self.send,
            refresh=self.refresh,
            clock=lambda: NOW,
        )


def actions(changes: list[Any]) -> list[tuple[str, str, str]]:
    return [(c.action, c.model, c.backend) for c in changes]


async def test_pass_moves_a_cpu_priority_model_back_evicting_the_lru_model() -> None:
    """The priority model on CPU goes back on GPU on its own backend after the least recently
    used other model is unloaded; the more recently used one stays."""
    fleet = Fleet({"a": 9 * GIB}, {"p:latest": 4 * GIB, "x:latest": 4 * GIB, "y:latest": 4 * GIB})
    fleet.put("a", "p:latest", vram=0)
    fleet.put("a", "x:latest", expires_in=200)
    fleet.put("a", "y:latest", expires_in=100)
    manager = fleet.manager(["p"])
    changes = await manager.run_pass()
    assert actions(changes) == [("evict", "y:latest", "a"), ("gpu", "p:latest", "a")]
    assert set(fleet.loaded["a"]) == {"p:latest", "x:latest"}
    assert fleet.loaded["a"]["p:latest"]["size_vram"] == 4 * GIB
    assert fleet.sent[-1][2] == {
        "model": "p:latest",
        "prompt": "",
        "keep_alive": -1,
        "stream": False,
    }
    # The next pass finds nothing to do.
    assert await manager.run_pass() == []


async def test_pass_moves_a_partial_priority_model_to_another_gpu_with_room() -> None:
    """Partly offloaded on a full backend, the priority model is unloaded there and loaded on
    the backend with room, evicting nothing."""
    fleet = Fleet({"a": 6 * GIB, "b": 8 * GIB}, {"p:latest": 4 * GIB, "x:latest": 4 * GIB})
    fleet.put("a", "x:latest")
    fleet.put("a", "p:latest", vram=2 * GIB)
    changes = await fleet.manager(["p"]).run_pass()
    assert actions(changes) == [("unload", "p:latest", "a"), ("gpu", "p:latest", "b")]
    assert "x:latest" in fleet.loaded["a"]
    assert fleet.loaded["b"]["p:latest"]["size_vram"] == 4 * GIB


async def test_pass_preloads_where_it_fits_and_keeps_priority_models_it_cannot_beat() -> None:
    """A priority model held nowhere is loaded on every backend with room; where another
    priority model fills the GPU it is not evicted, and the model is reported as not loaded."""
    fleet = Fleet(
        {"a": 8 * GIB, "b": 8 * GIB, "c": 4 * GIB},
        {"p:latest": 4 * GIB, "q:latest": 4 * GIB},
    )
    fleet.put("c", "q:latest", expires_in=1e10)
    changes = await fleet.manager(["q", "p"]).run_pass()
    assert sorted(actions(changes)) == [
        ("preload", "p:latest", "a"),
        ("preload", "p:latest", "b"),
        ("preload", "q:latest", "a"),
        ("preload", "q:latest", "b"),
    ]
    assert set(fleet.loaded["c"]) == {"q:latest"}


async def test_pass_without_vram_readings_loads_one_copy_and_lets_ollama_place_it() -> None:
    """No VRAM readings: one load, on the idle backend holding fewest models; no eviction."""
    fleet = Fleet({"a": 8 * GIB, "b": 8 * GIB}, {"p:latest": 4 * GIB, "x:latest": 4 * GIB})
    fleet.put("a", "x:latest")

    async def blind(b: BackendState) -> bool:
        await Fleet.refresh(fleet, b)
        b.vram_free_bytes = None
        return True

    manager = fleet.manager(["p"])
    manager._refresh = blind
    assert actions(await manager.run_pass()) == [("preload", "p:latest", "b")]


async def test_pass_keeps_a_priority_model_warm_before_it_expires() -> None:
    """A copy on GPU expiring before the pass after next is loaded again with keep_alive; one
    loaded forever is left alone."""
    fleet = Fleet({"a": 8 * GIB, "b": 8 * GIB}, {"p:latest": 4 * GIB})
    fleet.put("a", "p:latest", expires_in=90)
    fleet.put("b", "p:latest", expires_in=1e10)
    changes = await fleet.manager(["p"], interval_s=60).run_pass()
    assert actions(changes) == [("keep_warm", "p:latest", "a")]
    assert fleet.loaded["a"]["p:latest"]["expires_at"] > stamp(1e9)


async def test_failed_actions_are_counted_and_the_pass_goes_on() -> None:
    """A backend answering 500 counts an error and stops that model's placement only; the
    next priority model is still placed."""
    fleet = Fleet({"a": 8 * GIB, "b": 8 * GIB}, {"p:latest": 4 * GIB, "q:latest": 4 * GIB})
    fleet.tags = {"a": {"p:latest"}, "b": {"q:latest"}}
    fleet.fail.add("a")
    manager = fleet.manager(["p", "q"])
    changes = await manager.run_pass()
    assert actions(changes) == [("preload", "q:latest", "b")]
    errors = manager.metrics.placement_actions.labels(action="error", backend="a")
    assert errors._value.get() == 1


async def test_run_counts_a_failed_pass_and_stops_on_cancel() -> None:
    """run(): an exception in a pass is logged and counted, the loop goes on; cancel ends it."""
    fleet = Fleet({"a": 8 * GIB}, {"p:latest": 4 * GIB})
    manager = fleet.manager(["p"], interval_s=0.01)
    failed = asyncio.Event()
    passes = 0

    async def broken() -> list[Any]:
        nonlocal passes
        passes += 1
        if passes == 2:
            failed.set()
        raise RuntimeError("boom")

    manager.run_pass = broken  # type: ignore[method-assign]
    task = asyncio.create_task(manager.run())
    await asyncio.wait_for(failed.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert manager.metrics.placement_actions.labels(action="error", backend="")._value.get() >= 2


# Admin actions -------------------------------------------------------------------------------


async def test_actions_send_ollamas_load_and_unload_requests() -> None:
    """cpu loads with num_gpu 0; gpu unloads first, then loads without it; unload sends
    keep_alive 0; an embedding-only model falls back to /api/embed with an empty input."""
    fleet = Fleet({"a": 8 * GIB}, {"p:latest": 4 * GIB, "e:latest": GIB})
    manager = fleet.manager([], keep_alive="30m")
    for b in fleet.registry.all():
        await fleet.refresh(b)
    result = await manager.to_cpu("P")
    assert result == {"a": {"ok": True, "resident": "cpu", "size": 4 * GIB, "size_vram": 0}}
    assert fleet.sent[-1][2]["options"] == {"num_gpu": 0}
    assert fleet.sent[-1][2]["model"] == "p:latest"  # the backend's own spelling
    assert (await manager.to_gpu("p"))["a"]["resident"] == "gpu"
    assert [body.get("keep_alive") for _, _, body in fleet.sent[-2:]] == [0, "30m"]
    assert "options" not in fleet.sent[-1][2]
    assert (await manager.unload("p", "a"))["a"]["resident"] is None
    fleet.embedding.add("e:latest")
    assert (await manager.preload("e"))["a"]["resident"] == "gpu"
    assert fleet.sent[-1][1:] == (
        "/api/embed",
        {"model": "e:latest", "keep_alive": "30m", "input": ""},
    )


async def test_action_errors() -> None:
    """Unknown backend and a model not installed raise; a backend failing is reported per
    backend with its error."""
    fleet = Fleet({"a": 8 * GIB}, {"p:latest": 4 * GIB})
    manager = fleet.manager([])
    for b in fleet.registry.all():
        await fleet.refresh(b)
    with pytest.raises(UnknownBackendError):
        await manager.preload("p", "zz")
    with pytest.raises(NotInstalledError, match="not installed on backend 'a'"):
        await manager.preload("nope", "a")
    with pytest.raises(NotInstalledError, match="no healthy backend"):
        await manager.preload("nope")
    fleet.fail.add("a")
    result = await manager.preload("p")
    assert result == {
        "a": {"ok": False, "error": "a: HTTP 500: llama runner process has terminated"}
    }

    async def unreachable(url: str, body: dict[str, Any]) -> tuple[int, Any]:
        raise ConnectionRefusedError("connection refused")

    manager._send = unreachable
    assert "ConnectionRefusedError" in (await manager.unload("p"))["a"]["error"]


# Config --------------------------------------------------------------------------------------


def test_placement_config_keep_alive_forms() -> None:
    """keep_alive takes seconds, numeric strings (as from the environment) and Go durations;
    0, unitless junk and booleans are refused with one clear line."""
    for given, kept in ((-1, -1), ("-1", -1), ("3600", 3600), ("30m", "30m"), ("1h30m", "1h30m")):
        settings = load_config(None, overrides={"placement": {"keep_alive": given}})
        assert settings.placement.keep_alive == kept
    for bad in (0, "0s", "30 minutes", True, "inf"):
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides={"placement": {"keep_alive": bad}})
        assert info.value.problems[0].startswith("placement.keep_alive: ")
    with pytest.raises(ConfigError, match=r"placement\.interval_s"):
        load_config(None, overrides={"placement": {"interval_s": 0}})
    settings = load_config(None, env={"CORRAL_PLACEMENT__PRIORITY_MODELS": '["llama3.2"]'})
    assert settings.placement.priority_models == ["llama3.2"]
