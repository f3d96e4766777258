"""Chaos: a backend process SIGKILLed while it streams answers."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.load import Load, assert_all_clear, assert_cut_streams
from tests.chaos.support import poll, wait_healthy

pytestmark = pytest.mark.chaos


def test_backend_killed_mid_stream(sim_process_factory: Any, pair: Any) -> None:
    """Streams on the killed backend end with an error line or event; requests not yet
    answered move to the survivor; after a restart it is back in rotation; nothing leaks."""
    timing = {"tokens": 25, "token_interval_ms": 20}  # 0.5 s streams
    a, _, corral, check = pair(sim_process_factory, timing)

    def streaming_on_a() -> bool:
        """At least two answers on ``a`` have started (status sent) and not ended."""
        recent: list[dict[str, Any]] = a.stats()["recent"]
        return sum(1 for r in recent if r["status"] == 200 and r["ended"] is None) >= 2

    with Load(corral.url, workers=6) as load:
        assert poll(streaming_on_a, 5)
        a.kill()
        load.wait_for(8)
        a.restart()
        wait_healthy(corral, ["a", "b"])
        load.wait_for(4)
        outcomes = load.stop()

    assert_all_clear(outcomes)
    cut = assert_cut_streams(outcomes, "a", "backend a failed mid-stream")
    # Not yet answered when the backend died: retried on the survivor.
    assert all(o.verdict == "complete" for o in outcomes if not o.kind.stream)
    assert sum(o.verdict == "complete" for o in outcomes) > len(cut)
    check.assert_clean()
