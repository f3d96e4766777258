"""Chaos: every backend killed under load, then one restarted."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.chaos.load import Load, assert_all_clear
from tests.chaos.support import loads, poll, wait_healthy

pytestmark = pytest.mark.chaos


def test_all_backends_down_then_one_back(sim_process_factory: Any, pair: Any) -> None:
    """With nothing up, requests fail fast with a clear error (503 + Retry-After once health
    knows); /readyz turns 503; one backend back serves every new request."""
    a, b, corral, check = pair(sim_process_factory, {"tokens": 10, "token_interval_ms": 10})

    def ready_status() -> int:
        with corral.client(timeout=5) as client:
            return int(client.get("/readyz").status_code)

    with Load(corral.url, workers=6) as load:
        load.wait_for(10)
        a.kill()
        b.kill()
        assert poll(lambda: ready_status() == 503, 5)
        load.wait_for(20)
        a.restart()
        wait_healthy(corral, ["a"])
        back = time.monotonic()
        load.wait_for(20)
        outcomes = load.stop()

    assert_all_clear(outcomes)
    errors = [o for o in outcomes if o.verdict == "error"]
    assert any(o.status == 503 for o in errors), [str(o) for o in errors]
    for o in errors:
        assert o.seconds < 1.5, o  # fast, not waiting out first_token_s on dead backends
    after = [o for o in outcomes if o.started > back]
    assert len(after) >= 10
    assert all(o.verdict == "complete" and o.backend == "a" for o in after), [
        str(o) for o in after if o.verdict != "complete"
    ]
    entries = loads(corral)
    assert entries["a"]["available"]
    assert not entries["b"]["available"]
    check.assert_clean()
