"""Chaos: a backend that freezes and thaws every second (SIGSTOP / SIGCONT)."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.chaos.load import Load, assert_all_clear
from tests.chaos.support import poll, wait_healthy

pytestmark = pytest.mark.chaos


def test_flapping_backend(sim_process_factory: Any, pair: Any) -> None:
    """Down one second, up the next, twice: every request completes or ends with a clear
    error (a stalled stream gets its error line after idle_s), health follows, nothing leaks."""
    a, _, corral, check = pair(
        sim_process_factory,
        {"tokens": 15, "token_interval_ms": 20},  # 0.3 s streams
        # Two failed probes fit in one frozen second, so active health can follow the flapping.
        health={"interval_s": 0.1, "timeout_s": 0.2},
        timeouts={"idle_s": 0.5},
    )
    assert a.proc is not None
    went_down: list[bool] = []

    with Load(corral.url, workers=6) as load:
        load.wait_for(6)
        try:
            for _ in range(2):
                a.proc.send_signal(signal.SIGSTOP)
                down_until = time.monotonic() + 1.0
                while time.monotonic() < down_until:
                    went_down.append(
                        not corral.call(
                            lambda: corral.runtime.registry.get("a").available(time.monotonic())
                        )
                    )
                    time.sleep(0.05)
                a.proc.send_signal(signal.SIGCONT)
                time.sleep(1.0)  # the flapping's rhythm, not a wait for readiness
        finally:
            a.proc.send_signal(signal.SIGCONT)
        wait_healthy(corral, ["a", "b"])
        load.wait_for(6)
        outcomes = load.stop()

    assert any(went_down), "health never noticed the frozen backend"
    assert_all_clear(outcomes)
    assert all(o.backend == "a" for o in outcomes if o.verdict == "error")
    assert sum(o.verdict == "complete" for o in outcomes) > len(outcomes) // 2
    assert poll(lambda: a.stats()["in_flight"] == 0, 2)
    check.assert_clean()
