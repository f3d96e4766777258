"""The ledger of fleet-wide model operations a backend missed: what it owes, in what order,
and that it survives a restart."""

from __future__ import annotations

import json
from pathlib import Path

from corral.fleet.gpu.sampler import NullSampler
from corral.fleet.replays import MAX_ATTEMPTS, ReplayLedger
from corral.runtime import Runtime
from tests.helpers import offline_settings


def owed(ledger: ReplayLedger, backend: str) -> list[tuple[str, str]]:
    return [(r.action, r.model) for r in ledger.owed(backend)]


def test_a_newer_operation_on_a_model_replaces_an_older_one() -> None:
    """pull x then delete x: only the delete is owed; the other backend's entries stay."""
    ledger = ReplayLedger()
    ledger.add([("b", "down"), ("c", "down")], "pull", {"model": "x", "stream": True})
    ledger.add([("b", "down")], "delete", {"model": "X:latest"})
    assert owed(ledger, "b") == [("delete", "X:latest")]
    assert owed(ledger, "c") == [("pull", "x")]
    assert ledger.owed("c")[0].body == {"model": "x"}  # the client's stream flag is not kept
    assert ledger.hidden("b") == {"x:latest"}
    assert ledger.hidden("c") == set()


def test_a_model_a_pending_copy_reads_is_not_replaced() -> None:
    """pull y, copy y to z, delete y: the pull stays, or the copy would find nothing."""
    ledger = ReplayLedger()
    ledger.add([("b", "down")], "pull", {"model": "y"})
    ledger.add([("b", "down")], "copy", {"source": "y", "destination": "z"})
    ledger.add([("b", "down")], "delete", {"model": "y"})
    assert owed(ledger, "b") == [("pull", "y"), ("copy", "z"), ("delete", "y")]


def test_taking_part_settles_what_was_owed() -> None:
    """A backend that did a later operation on the model owes nothing older on it."""
    ledger = ReplayLedger()
    ledger.add([("b", "failed")], "delete", {"model": "x"})
    ledger.add([("b", "failed")], "pull", {"model": "other"})
    ledger.settle(["b"], "pull", {"model": "x"})
    assert owed(ledger, "b") == [("pull", "other")]


def test_a_replay_that_keeps_failing_backs_off_then_is_given_up() -> None:
    ledger = ReplayLedger()
    ledger.add([("b", "down")], "pull", {"model": "x"})
    [replay] = ledger.owed("b")
    assert ledger.failed(replay, "boom", now=100.0)
    first = replay.not_before
    assert ledger.failed(replay, "boom", now=100.0)
    assert replay.not_before - 100.0 == 2 * (first - 100.0)
    for _ in range(MAX_ATTEMPTS - 3):
        assert ledger.failed(replay, "boom", now=100.0)
    assert replay.not_before - 100.0 <= 300.0
    assert not ledger.failed(replay, "boom", now=100.0)
    assert ledger.all() == []


def test_what_is_owed_survives_a_restart(tmp_path: Path) -> None:
    """The state file keeps the ledger; a restarted corral owes the same, and ignores entries
    it cannot read."""
    state = tmp_path / "state.json"
    settings = offline_settings("a", "b", server={"state_file": str(state)})
    first = Runtime(settings, gpu_sampler=NullSampler())
    first.ledger.add([("b", "down")], "delete", {"model": "x"})
    first.ledger.add([("b", "failed")], "copy", {"source": "x2", "destination": "y"})
    saved = json.loads(state.read_text())
    assert [r["action"] for r in saved["replays"]] == ["delete", "copy"]
    saved["replays"].append({"backend": "b", "action": "rm -rf", "body": {}})
    saved["replays"].append("junk")
    state.write_text(json.dumps(saved))
    again = Runtime(settings, gpu_sampler=NullSampler())
    assert [r.view() for r in again.ledger.all()] == [r.view() for r in first.ledger.all()]
    pending = again.metrics.registry.get_sample_value(
        "corral_model_replays_pending", {"backend": "b"}
    )
    assert pending == 2


def test_a_removed_backend_owes_nothing(tmp_path: Path) -> None:
    settings = offline_settings("a", "b")
    rt = Runtime(settings, gpu_sampler=NullSampler())
    rt.ledger.add([("b", "down")], "delete", {"model": "x"})
    rt.registry.remove("b")
    assert rt.ledger.all() == []
