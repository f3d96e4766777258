"""Fan-out model management over a scripted FakeTransport: each backend's answer merged into
one, failures reported per backend (no sockets)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest

from corral.errors import UpstreamConnectError
from corral.fleet.gpu.sampler import NullSampler
from corral.proxy.fanout import FanOut
from corral.runtime import Runtime
from corral.upstream import Upstream
from tests.helpers import Answer, FakeTransport, RecordingSend, base_url, offline_settings

A, B = base_url("a"), base_url("b")
EMPTY_OK = Answer(200, [], content_type=None)


@dataclass
class Fleet:
    rt: Runtime
    fake: FakeTransport
    fanout: FanOut

    async def call(
        self, method: str, path: str, body: dict[str, Any], query: bytes = b""
    ) -> RecordingSend:
        """One management request, as the front door hands it over."""
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "query_string": query,
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
        }
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await never.wait()  # the client stays until the answer is complete
            return {"type": "http.disconnect"}

        async def read_body() -> bytes:
            return json.dumps(body).encode()

        send = RecordingSend()
        await self.fanout.handle(
            scope,
            receive,
            send,
            request_id="rid-9",
            headers=[(b"content-type", b"application/json"), (b"x-request-id", b"rid-9")],
            read_body=read_body,
        )
        assert self.fake.pool_stats() == (0, 0)
        return send

    def probes(self, base: str) -> int:
        """How many times the backend's model list was read."""
        return sum(r.url == f"{base}/api/tags" for r in self.fake.requests)


@pytest.fixture
async def fleet() -> Fleet:
    fake = FakeTransport().ollama(A, "m", "x").ollama(B, "m", "x")
    settings = offline_settings("a", "b")
    rt = Runtime(
        settings, upstream=Upstream(settings.timeouts, transport=fake), gpu_sampler=NullSampler()
    )
    await rt.health.probe_all()
    return Fleet(rt, fake, rt.fanout)


async def test_delete_succeeds_where_the_model_was(fleet: Fleet) -> None:
    """Delete on two backends, one never had the model: that is success (an empty 200, as
    Ollama's), not a failure of the fleet."""
    fleet.fake.script(f"{A}/api/delete", Answer.json({"error": "model 'x' not found"}, 404))
    fleet.fake.script(f"{B}/api/delete", EMPTY_OK)
    send = await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert send.status == 200
    assert send.body == b""
    assert send.header("x-corral-backend") == "a,b"
    sent = fleet.fake.sent("/api/delete")
    assert sorted(r.url for r in sent) == [f"{A}/api/delete", f"{B}/api/delete"]
    assert all(r.method == "DELETE" and r.json() == {"model": "x"} for r in sent)
    # Only the backend whose model list changed is read again at once.
    assert (fleet.probes(A), fleet.probes(B)) == (1, 2)


async def test_delete_everywhere_is_an_empty_200(fleet: Fleet) -> None:
    """Delete that every backend accepts answers 200 with an empty body, as Ollama does."""
    fleet.fake.script(f"{A}/api/delete", EMPTY_OK)
    fleet.fake.script(f"{B}/api/delete", EMPTY_OK)
    send = await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert (send.status, send.body) == (200, b"")


async def test_delete_not_found_anywhere_keeps_ollamas_404(fleet: Fleet) -> None:
    """When every backend says not found, the client gets that one message with 404."""
    for base in (A, B):
        fleet.fake.script(f"{base}/api/delete", Answer.json({"error": "model 'x' not found"}, 404))
    send = await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert send.status == 404
    assert json.loads(send.body)["error"] == "model 'x' not found"


async def test_pull_stream_merges_every_backends_progress(fleet: Fleet) -> None:
    """A streamed pull: each backend's lines tagged with its id, its own finish line, then one
    overall success."""
    fleet.fake.script(
        f"{A}/api/pull",
        Answer.ndjson(
            {"status": "pulling manifest"},
            {"status": "downloading", "completed": 1, "total": 2},
            {"status": "success"},
        ),
    )
    fleet.fake.script(
        f"{B}/api/pull", Answer.ndjson({"status": "pulling manifest"}, {"status": "success"})
    )
    send = await fleet.call("POST", "/api/pull", {"model": "x"})
    assert send.status == 200
    assert send.header("content-type") == "application/x-ndjson"
    assert send.finished
    lines = send.lines()
    assert [ln for ln in lines if ln.get("backend") == "a"] == [
        {"backend": "a", "status": "pulling manifest"},
        {"backend": "a", "status": "downloading", "completed": 1, "total": 2},
        {"backend": "a", "status": "backend finished"},
    ]
    assert [ln for ln in lines if ln.get("backend") == "b"] == [
        {"backend": "b", "status": "pulling manifest"},
        {"backend": "b", "status": "backend finished"},
    ]
    assert lines[-1] == {"status": "success"}
    # The backends are always asked for a stream, and read their model lists again after.
    assert all(r.json() == {"model": "x", "stream": True} for r in fleet.fake.sent("/api/pull"))
    assert (fleet.probes(A), fleet.probes(B)) == (2, 2)


async def test_pull_without_stream_answers_one_object(fleet: Fleet) -> None:
    """``stream: false``: the backends still stream, the client gets one summary object."""
    for base in (A, B):
        fleet.fake.script(f"{base}/api/pull", Answer.ndjson({"status": "success"}))
    send = await fleet.call("POST", "/api/pull", {"model": "x", "stream": False})
    assert send.status == 200
    assert json.loads(send.body) == {
        "status": "success",
        "backends": {"a": {"status": "success"}, "b": {"status": "success"}},
    }
    assert all(r.json()["stream"] is True for r in fleet.fake.sent("/api/pull"))


async def test_unreachable_backend_is_reported_per_backend(fleet: Fleet) -> None:
    """A backend that cannot be reached is named with its error; the other still pulls."""
    fleet.fake.script(f"{A}/api/pull", UpstreamConnectError("connection refused"))
    fleet.fake.script(f"{B}/api/pull", Answer.ndjson({"status": "success"}))
    send = await fleet.call("POST", "/api/pull", {"model": "x", "stream": False})
    assert send.status == 502
    assert json.loads(send.body) == {
        "error": "pull failed on 1 of 2 backends: a: backend unreachable: connection refused",
        "failed": ["a"],
        "backends": {
            "a": {"error": "backend unreachable: connection refused"},
            "b": {"status": "success"},
        },
    }


async def test_unreachable_backend_in_a_stream_gets_its_error_line(fleet: Fleet) -> None:
    """Streamed: the unreachable backend's error line, the other's success, then the failure."""
    fleet.fake.script(f"{A}/api/pull", UpstreamConnectError("connection refused"))
    fleet.fake.script(f"{B}/api/pull", Answer.ndjson({"status": "success"}))
    send = await fleet.call("POST", "/api/pull", {"model": "x"})
    assert send.status == 200
    lines = send.lines()
    assert {"backend": "a", "error": "backend unreachable: connection refused"} in lines
    assert {"backend": "b", "status": "backend finished"} in lines
    assert lines[-1] == {
        "error": "pull failed on 1 of 2 backends: a: backend unreachable: connection refused",
        "failed": ["a"],
    }


async def test_delete_on_an_unreachable_backend_is_reported(fleet: Fleet) -> None:
    """Delete where one backend cannot be reached: 502 naming it, the other's success kept."""
    fleet.fake.script(f"{A}/api/delete", UpstreamConnectError("connection refused"))
    fleet.fake.script(f"{B}/api/delete", EMPTY_OK)
    send = await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert send.status == 502
    body = json.loads(send.body)
    assert body["failed"] == ["a"]
    assert body["backends"]["a"] == {"error": "backend unreachable: connection refused"}
    assert body["backends"]["b"] == {"status": "success"}


async def test_a_backend_that_is_down_is_named_not_hidden(fleet: Fleet) -> None:
    """Delete and pull while one backend is down: they succeed on the others, and the answer
    names the one left out instead of an empty 200 that looks like full success."""
    fleet.rt.registry.get("b").healthy = False
    fleet.fake.script(f"{A}/api/delete", EMPTY_OK)
    send = await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert (send.status, json.loads(send.body)) == (200, {"skipped": ["b"]})
    fleet.fake.script(f"{A}/api/pull", Answer.ndjson({"status": "success"}))
    send = await fleet.call("POST", "/api/pull", {"model": "x"})
    assert send.lines()[-1] == {"status": "success", "skipped": ["b"]}
    assert not fleet.fake.sent("/api/pull")[0].url.startswith(B)


# Replays: a fleet-wide operation a backend missed reaches it when it is back ------------------


async def replay(fleet: Fleet) -> None:
    """One replay round, waited for."""
    await asyncio.gather(*fleet.fanout.replay_due())


def replays_counted(fleet: Fleet, backend: str, action: str, outcome: str) -> float:
    value = fleet.rt.metrics.registry.get_sample_value(
        "corral_model_replays_total", {"backend": backend, "action": action, "outcome": outcome}
    )
    return value or 0.0


async def test_a_delete_missed_while_down_is_replayed_when_the_backend_returns(
    fleet: Fleet,
) -> None:
    """b is down during a fleet delete: the answer names it, the models view lists what it
    owes, b's copy of the model is not routed to once it is back, and the delete reaches it."""
    b = fleet.rt.registry.get("b")
    b.healthy = False
    fleet.fake.script(f"{A}/api/delete", EMPTY_OK)
    send = await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert (send.status, json.loads(send.body)) == (200, {"skipped": ["b"]})
    [owed] = [r.view() for r in fleet.rt.ledger.all()]
    assert owed | {"since": 0} == {
        "backend": "b",
        "action": "delete",
        "model": "x",
        "reason": "down",
        "since": 0,
        "attempts": 0,
        "last_error": None,
    }
    await replay(fleet)
    assert not fleet.fake.sent("/api/delete")[1:]  # nothing is sent to a backend that is down
    # b comes back still listing x: routing does not send x there while b owes the delete.
    assert await fleet.rt.health.probe(b)
    assert b.healthy
    assert "x:latest" not in b.models
    assert "m:latest" in b.models
    fleet.fake.script(f"{B}/api/delete", EMPTY_OK)
    await replay(fleet)
    [sent] = [r for r in fleet.fake.sent("/api/delete") if r.url.startswith(B)]
    assert (sent.method, sent.json()) == ("DELETE", {"model": "x"})
    assert fleet.rt.ledger.all() == []
    assert replays_counted(fleet, "b", "delete", "done") == 1
    assert (
        fleet.rt.metrics.registry.get_sample_value("corral_model_replays_pending", {"backend": "b"})
        is None
    )


async def test_a_delete_that_only_a_down_backend_could_do_is_not_a_404(fleet: Fleet) -> None:
    """The only backend holding the model is down: the delete is owed to it, not a 404."""
    fleet.rt.registry.get("b").healthy = False
    fleet.fake.script(f"{A}/api/delete", Answer.json({"error": "model 'x' not found"}, 404))
    fleet.rt.registry.get("a").models.discard("x:latest")
    send = await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert (send.status, json.loads(send.body)) == (200, {"skipped": ["b"]})
    assert [(r.backend, r.action) for r in fleet.rt.ledger.all()] == [("b", "delete")]


async def test_a_failed_pull_is_retried_later_and_later_operations_wait_for_it(
    fleet: Fleet,
) -> None:
    """b failed a pull (unreachable) and missed a copy of it: the copy waits for the pull; a
    pull that fails again is tried later, and both run in order once b answers."""
    fleet.fake.script(f"{A}/api/pull", Answer.ndjson({"status": "success"}))
    fleet.fake.script(f"{B}/api/pull", UpstreamConnectError("connection refused"))
    await fleet.call("POST", "/api/pull", {"model": "y"})
    fleet.rt.registry.get("b").draining = True
    fleet.fake.script(f"{A}/api/copy", EMPTY_OK)
    send = await fleet.call("POST", "/api/copy", {"source": "y", "destination": "z"})
    assert json.loads(send.body) == {"skipped": ["b"]}
    owed = fleet.rt.ledger.owed("b")
    assert [(r.action, r.model, r.reason) for r in owed] == [
        ("pull", "y", "failed"),
        ("copy", "z", "draining"),
    ]
    assert owed[1].view()["source"] == "y"
    fleet.rt.registry.get("b").draining = False
    fleet.fake.script(f"{B}/api/pull", UpstreamConnectError("connection refused"))
    await replay(fleet)
    assert [r.attempts for r in fleet.rt.ledger.owed("b")] == [1, 0]
    assert fleet.rt.ledger.owed("b")[0].last_error == "backend unreachable: connection refused"
    assert not [r for r in fleet.fake.sent("/api/copy") if r.url.startswith(B)]
    assert replays_counted(fleet, "b", "pull", "failed") == 1
    await replay(fleet)  # backing off: not asked again at once
    assert len([r for r in fleet.fake.sent("/api/pull") if r.url.startswith(B)]) == 2
    for replay_ in fleet.rt.ledger.owed("b"):
        replay_.not_before = 0.0
    fleet.fake.script(f"{B}/api/pull", Answer.ndjson({"status": "success"}))
    fleet.fake.script(f"{B}/api/copy", EMPTY_OK)
    await replay(fleet)
    assert fleet.rt.ledger.all() == []
    [copy] = [r for r in fleet.fake.sent("/api/copy") if r.url.startswith(B)]
    assert copy.json() == {"source": "y", "destination": "z"}


async def test_the_fleets_latest_intent_wins(fleet: Fleet) -> None:
    """b missed a pull and then a delete of the same model: it owes only the delete. A later
    pull that b takes part in settles the delete it owed."""
    b = fleet.rt.registry.get("b")
    b.healthy = False
    fleet.fake.script(f"{A}/api/pull", Answer.ndjson({"status": "success"}))
    await fleet.call("POST", "/api/pull", {"model": "x"})
    fleet.fake.script(f"{A}/api/delete", EMPTY_OK)
    await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert [r.action for r in fleet.rt.ledger.owed("b")] == ["delete"]
    b.healthy = True
    for base in (A, B):
        fleet.fake.script(f"{base}/api/pull", Answer.ndjson({"status": "success"}))
    await fleet.call("POST", "/api/pull", {"model": "x"})
    assert fleet.rt.ledger.all() == []


async def test_a_refused_replay_is_given_up(fleet: Fleet) -> None:
    """A replay the backend refuses (400) will not succeed by asking again: logged, counted,
    dropped."""
    fleet.rt.registry.get("b").healthy = False
    fleet.fake.script(f"{A}/api/pull", Answer.ndjson({"status": "success"}))
    await fleet.call("POST", "/api/pull", {"model": "x"})
    fleet.rt.registry.get("b").healthy = True
    fleet.fake.script(f"{B}/api/pull", Answer.json({"error": "invalid model name"}, 400))
    await replay(fleet)
    assert fleet.rt.ledger.all() == []
    assert replays_counted(fleet, "b", "pull", "abandoned") == 1


async def test_operations_aimed_at_named_backends_owe_nothing(fleet: Fleet) -> None:
    """``?backend=a`` is not meant for the fleet: b, down meanwhile, owes nothing."""
    fleet.fake.script(f"{A}/api/delete", EMPTY_OK)
    fleet.rt.registry.get("b").healthy = False
    send = await fleet.call("DELETE", "/api/delete", {"model": "x"}, query=b"backend=a")
    assert (send.status, send.body) == (200, b"")
    assert fleet.rt.ledger.all() == []


async def test_a_model_change_clears_the_cached_listings(fleet: Fleet) -> None:
    """The aggregate listings are cached for a second; a delete that changed a backend's
    models clears them, so the next /api/tags or /api/ps is read afresh."""
    listing = fleet.rt.listing
    listing._cache["/api/ps"] = (("a", "b"), 0.0, [])
    fleet.fake.script(f"{A}/api/delete", EMPTY_OK)
    fleet.fake.script(f"{B}/api/delete", Answer.json({"error": "model 'x' not found"}, 404))
    await fleet.call("DELETE", "/api/delete", {"model": "x"})
    assert listing._cache == {}
