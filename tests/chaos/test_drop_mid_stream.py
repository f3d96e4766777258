"""Chaos: a backend that drops its TCP connection a few tokens into every answer."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.load import STREAMS, assert_all_clear, assert_cut_streams, run_load
from tests.chaos.relay import Relay
from tests.chaos.support import poll, wait_healthy

pytestmark = pytest.mark.chaos


def test_connection_dropped_mid_stream(sim_factory: Any, pair: Any) -> None:
    """Streams cut by the backend end with an error line or event naming it; plain requests are
    retried on the other backend; nothing leaks; traffic returns to it once it behaves."""
    a, _, corral, check = pair(sim_factory, {"tokens": 12, "token_interval_s": 0.01})
    a.set_faults(drop_after_tokens=3)

    outcomes = run_load(corral.url, 40, workers=6)

    assert_all_clear(outcomes)
    assert_cut_streams(outcomes, "a", "backend a failed mid-stream")
    # A drop before any byte reached the client is retried elsewhere.
    assert all(o.verdict == "complete" for o in outcomes if not o.kind.stream)

    a.set_faults(drop_after_tokens=None)
    wait_healthy(corral, ["a", "b"])
    check.assert_clean()
    assert poll(lambda: a.stats()["in_flight"] == 0, 2)
    after = run_load(corral.url, 10, workers=2)
    assert all(o.verdict == "complete" for o in after), [str(o) for o in after]
    assert {o.backend for o in after} == {"a", "b"}


def test_connection_cut_inside_a_line(sim_factory: Any, chaos_corral: Any, leak_check: Any) -> None:
    """A connection lost in the middle of a line (not between two, as a server that stops
    writing would): the client still gets whole lines, then one parseable error line or event."""
    sim = sim_factory(name="a", tokens=12, token_interval_s=0.01)
    relay = Relay(sim.port).start()
    try:
        corral = chaos_corral(
            [{"id": "a", "url": relay.url}],
            # Keep it in rotation: this is about what each cut stream looks like.
            health={"consecutive_errors": 1000, "error_min_requests": 1000},
        )
        check = leak_check(corral, [relay.port])
        relay.cut_streams_at = 17

        outcomes = run_load(corral.url, 12, workers=3, kinds=STREAMS)

        assert_all_clear(outcomes)
        assert all(o.verdict == "error" and o.mid_stream for o in outcomes), outcomes
        relay.cut_streams_at = None
        wait_healthy(corral, ["a"])
        check.assert_clean()
    finally:
        relay.stop()
