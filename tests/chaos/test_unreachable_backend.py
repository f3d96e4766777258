"""Chaos: a backend host that vanishes from the network (connection attempts time out)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.load import assert_all_clear, run_load
from tests.chaos.relay import Relay
from tests.chaos.support import ROTATION, wait_healthy

pytestmark = pytest.mark.chaos

CONNECT_S = 1.0


@pytest.fixture
def relay(sim_factory: Any) -> Iterator[Relay]:
    """A relay in front of a simulator that can turn into a black hole."""
    sim = sim_factory(name="a", tokens=8, token_interval_s=0.01)
    relay = Relay(sim.port).start()
    yield relay
    relay.stop()


def test_unreachable_backend_is_retried_elsewhere(
    relay: Relay, sim_factory: Any, chaos_corral: Any, leak_check: Any
) -> None:
    """A connect timeout means nothing was sent: the request moves to another backend after
    connect_s instead of failing with 504, and the host leaves rotation until it answers."""
    b = sim_factory(name="b", tokens=8, token_interval_s=0.01)
    corral = chaos_corral(
        [{"id": "a", "url": relay.url}, {"id": "b", "url": b.url}],
        balancer=ROTATION,
        timeouts={"connect_s": CONNECT_S},
    )
    check = leak_check(corral, [relay.port, b.port])
    relay.blackhole()

    outcomes = run_load(corral.url, 24, workers=4)

    assert_all_clear(outcomes)
    assert all(o.verdict == "complete" and o.backend == "b" for o in outcomes), [
        str(o) for o in outcomes if o.verdict != "complete"
    ]
    waited = [o for o in outcomes if o.seconds >= CONNECT_S]
    assert waited, "no request met the unreachable backend"
    assert all(o.seconds < CONNECT_S + 1.5 for o in outcomes), max(o.seconds for o in outcomes)

    relay.restore()
    wait_healthy(corral, ["a", "b"])
    check.assert_clean()
    after = run_load(corral.url, 10, workers=2)
    assert all(o.verdict == "complete" for o in after), [str(o) for o in after]
    assert {o.backend for o in after} == {"a", "b"}
