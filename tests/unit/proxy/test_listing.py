"""The merged listings behind the upstream seam: one odd backend cannot break them, and
callers in the same second share one fan-out (a scripted FakeTransport, no sockets)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from corral.fleet.backends import BackendRegistry
from corral.metrics import Metrics
from corral.proxy.listing import Listing, version_key
from corral.upstream import Upstream
from tests.helpers import Answer, FakeClock, FakeTransport, Pause, RecordingSend, backend
from tests.helpers import offline_settings as settings

A, B = "http://127.0.0.1:1/a", "http://127.0.0.1:1/b"
GOOD_TAGS = {"models": [{"name": "good:latest", "model": "good:latest", "size": 10}]}
GOOD_PS = {"models": [{"name": "good:latest", "size": 10, "size_vram": 10}]}


def make(fake: FakeTransport, clock: FakeClock | None = None) -> tuple[Listing, Metrics]:
    registry = BackendRegistry([backend("a"), backend("b")])
    metrics = Metrics()
    upstream = Upstream(settings().timeouts, transport=fake)
    listing = Listing(registry, upstream, 1.0, metrics, clock=clock or FakeClock())
    return listing, metrics


def bad_entries(metrics: Metrics, backend_id: str) -> float:
    value = metrics.registry.get_sample_value(
        "corral_backend_malformed_total", {"backend": backend_id, "reason": "bad_entry"}
    )
    return value or 0.0


def asked(fake: FakeTransport, path: str) -> int:
    """How many requests for ``path`` reached the backends."""
    return sum(r.url.endswith(path) for r in fake.requests)


async def version(listing: Listing) -> str:
    send = RecordingSend()
    await listing.version(send, head=False)
    assert send.status == 200
    found: str = json.loads(send.body)["version"]
    return found


async def aggregated(listing: Listing, path: str) -> tuple[RecordingSend, Any]:
    send = RecordingSend()
    await listing.aggregated({"method": "GET"}, send, path, "rid")
    return send, json.loads(send.body)


async def test_a_5000_digit_version_is_left_out() -> None:
    """One backend's absurd version does not break ``/api/version``: the others answer."""
    fake = FakeTransport()
    fake.always(f"{A}/api/version", Answer.json({"version": "9" * 5000}))
    fake.always(f"{B}/api/version", Answer.json({"version": "0.9.1"}))
    listing, metrics = make(fake)
    assert await version(listing) == "0.9.1"
    assert bad_entries(metrics, "a") == 1


async def test_odd_versions_are_left_out() -> None:
    """A version that is a number, a list, or no version at all is skipped and counted."""
    for odd in (12, ["0.1"], {"v": 1}, "", "not a version", None):
        fake = FakeTransport()
        fake.always(f"{A}/api/version", Answer.json({"version": odd}))
        fake.always(f"{B}/api/version", Answer.json({"version": "0.9.1"}))
        listing, metrics = make(fake)
        assert await version(listing) == "0.9.1", odd
        assert bad_entries(metrics, "a") == 1


def test_version_key_reads_no_bignum() -> None:
    """Versions order numerically, and a long run of digits costs no huge int."""
    assert version_key("0.10.0") > version_key("0.9.9") > version_key("0.9.9-rc1")
    assert version_key("1" * 5000)[0] == int("1" * 18)


async def test_odd_ps_entries_are_skipped_and_the_rest_answer() -> None:
    """``/api/ps`` with a list for an entry, a string size, a numeric name: those entries are
    left out and counted, the well-formed ones (of both backends) answered."""
    odd = {
        "models": [
            ["not", "a", "dict"],
            {"name": "s:latest", "size": "4GB"},
            {"name": 42, "size": 1},
            {"name": "ok:latest", "size": 5, "size_vram": 5},
        ]
    }
    fake = FakeTransport()
    fake.always(f"{A}/api/ps", Answer.json(odd))
    fake.always(f"{B}/api/ps", Answer.json(GOOD_PS))
    listing, metrics = make(fake)
    send, body = await aggregated(listing, "/api/ps")
    assert send.status == 200
    assert sorted((m["name"], m["backend"]) for m in body["models"]) == [
        ("good:latest", "b"),
        ("ok:latest", "a"),
    ]
    assert bad_entries(metrics, "a") == 3


async def test_a_tags_answer_that_is_no_model_list_is_left_out() -> None:
    """``/api/tags`` answered with a list, or ``models`` that is a string: that backend is left
    out of ``/api/tags`` and ``/v1/models`` (and counted), the others answer."""
    for odd in ([1, 2], {"models": "everything"}, "text"):
        fake = FakeTransport()
        fake.always(f"{A}/api/tags", Answer.json(odd))
        fake.always(f"{B}/api/tags", Answer.json(GOOD_TAGS))
        listing, metrics = make(fake)
        send, body = await aggregated(listing, "/api/tags")
        assert send.status == 200
        assert [m["name"] for m in body["models"]] == ["good:latest"]
        assert send.header("x-corral-backend") == "b"
        send, body = await aggregated(listing, "/v1/models")
        assert [m["id"] for m in body["data"]] == ["good:latest"]
        assert bad_entries(metrics, "a") == 1


async def test_concurrent_callers_share_one_fan_out() -> None:
    """Fifty clients asking ``/api/version`` at once cost each backend one request."""
    hold = Pause()
    fake = FakeTransport()
    fake.always(f"{A}/api/version", Answer.json({"version": "0.9.0"}, wait=hold))
    fake.always(f"{B}/api/version", Answer.json({"version": "0.9.1"}))
    listing, _ = make(fake)
    calls = [asyncio.ensure_future(version(listing)) for _ in range(50)]
    await hold.reached.wait()
    hold.release()
    assert await asyncio.gather(*calls) == ["0.9.0"] * 50
    assert asked(fake, "/api/version") == 2


async def test_answers_are_cached_for_a_second_and_invalidated() -> None:
    """Within a second the cached answer serves; after it, or after ``invalidate()``, the
    backends are asked again."""
    clock = FakeClock()
    fake = FakeTransport().ollama(A, "m").ollama(B, "m")
    listing, _ = make(fake, clock)
    await aggregated(listing, "/api/tags")
    await aggregated(listing, "/v1/models")
    assert asked(fake, "/api/tags") == 2
    clock.now += 0.5
    await aggregated(listing, "/api/tags")
    assert asked(fake, "/api/tags") == 2
    clock.now += 0.6
    await aggregated(listing, "/api/tags")
    assert asked(fake, "/api/tags") == 4
    listing.invalidate()
    await aggregated(listing, "/api/tags")
    assert asked(fake, "/api/tags") == 6


async def test_a_change_of_the_fleets_models_invalidates_the_cache() -> None:
    """A probe that finds new models (after a pull) makes the next listing ask again."""
    fake = FakeTransport().ollama(A, "m").ollama(B, "m")
    listing, _ = make(fake)
    await aggregated(listing, "/api/tags")
    listing.registry.get("a").models = {"new:latest"}
    listing.registry.refresh_models()
    await aggregated(listing, "/api/tags")
    assert asked(fake, "/api/tags") == 4


async def test_a_backend_going_down_is_not_served_from_the_cache() -> None:
    """The cache is per set of available backends: one that left is not listed from it."""
    fake = FakeTransport().ollama(A, "ma").ollama(B, "mb")
    listing, _ = make(fake)
    _, body = await aggregated(listing, "/api/tags")
    assert sorted(m["name"] for m in body["models"]) == ["ma", "mb"]
    listing.registry.get("a").healthy = False
    _, body = await aggregated(listing, "/api/tags")
    assert [m["name"] for m in body["models"]] == ["mb"]


async def test_a_caller_that_leaves_does_not_cancel_the_others() -> None:
    """The shared fan-out outlives a cancelled caller."""
    hold = Pause()
    fake = FakeTransport()
    fake.always(f"{A}/api/version", Answer.json({"version": "0.9.0"}, wait=hold))
    fake.always(f"{B}/api/version", Answer.json({"version": "0.9.0"}))
    listing, _ = make(fake)
    first = asyncio.ensure_future(version(listing))
    second = asyncio.ensure_future(version(listing))
    await hold.reached.wait()
    first.cancel()
    hold.release()
    assert await second == "0.9.0"
