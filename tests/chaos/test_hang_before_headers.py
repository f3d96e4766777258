"""Chaos: a backend that accepts requests and never answers (no headers, no byte)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.load import assert_all_clear, run_load
from tests.chaos.support import poll, wait_healthy

pytestmark = pytest.mark.chaos

FIRST_TOKEN_S = 2.0


def test_backend_hanging_before_headers(sim_factory: Any, pair: Any) -> None:
    """Requests caught by the hang get a 504 after first_token_s (not a hang, not a retry that
    doubles the work); corral hangs up on the backend, ejects it, and takes it back later."""
    a, _, corral, check = pair(
        sim_factory,
        {"tokens": 8, "token_interval_s": 0.01},
        health={"error_min_requests": 2},  # eject after two timeouts
        timeouts={"first_token_s": FIRST_TOKEN_S},
    )
    a.set_faults(hang=True)

    outcomes = run_load(corral.url, 30, workers=6)

    assert_all_clear(outcomes)
    errors = [o for o in outcomes if o.verdict == "error"]
    assert errors, "no request met the hanging backend"
    for o in errors:
        assert o.status == 504, o
        assert "backend a did not answer in time" in o.why, o
        assert o.seconds < FIRST_TOKEN_S + 1.5, o
    assert all(o.backend == "b" for o in outcomes if o.verdict == "complete")
    # Ejected after the timeouts: the rest of the load went to b.
    assert sum(o.verdict == "complete" for o in outcomes) >= 20
    # corral closed every hung upstream request: the backend sees them cancelled.
    assert poll(lambda: a.stats()["in_flight"] == 0, 2), a.stats()
    assert a.stats()["cancelled"] >= len(errors)

    a.set_faults(hang=False)
    wait_healthy(corral, ["a", "b"])
    check.assert_clean()
    after = run_load(corral.url, 10, workers=2)
    assert all(o.verdict == "complete" for o in after), [str(o) for o in after]
    assert {o.backend for o in after} == {"a", "b"}
