"""corral_event_loop_lag_seconds: the loop's delay, measured from inside corral."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.helpers import metric, poll

pytestmark = pytest.mark.integration


def test_a_blocked_loop_shows_up_as_lag(sim_factory: Any, corral_factory: Any) -> None:
    """Idle, the lag stays small; a 0.3 s block of corral's loop is recorded as ≥ 0.25 s."""
    sim = sim_factory(name="a")
    corral = corral_factory([{"id": "a", "url": sim.url}])
    count = "corral_event_loop_lag_seconds_count "
    slow = 'corral_event_loop_lag_seconds_bucket{le="0.25"}'
    with corral.client() as client:
        assert poll(lambda: metric(client, count) >= 3, 5)
        assert metric(client, slow) == metric(client, count)  # nothing that slow yet
        assert corral.loop is not None
        corral.loop.call_soon_threadsafe(time.sleep, 0.3)  # block corral's event loop
        assert poll(lambda: metric(client, slow) < metric(client, count), 5)
