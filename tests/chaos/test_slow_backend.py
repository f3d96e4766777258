"""Chaos: one backend ten times slower than the others."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.chaos.load import assert_all_clear, run_load
from tests.chaos.support import loads

pytestmark = pytest.mark.chaos


@pytest.mark.parametrize("strategy", ["least_connections", "least_response_time"])
def test_slow_backend_among_fast_ones(
    strategy: str, sim_factory: Any, chaos_corral: Any, leak_check: Any
) -> None:
    """Load-aware strategies send most requests to the fast backends; the slow one's requests
    still complete, and slowness is not mistaken for failure (it stays in rotation)."""
    timing = {"ttft_s": 0.01, "tokens": 8, "token_interval_s": 0.005}
    fast = [sim_factory(name=f"fast{i}", **timing) for i in (1, 2)]
    slow = sim_factory(name="slow", **timing)
    sims = [*fast, slow]
    corral = chaos_corral(
        [{"id": s.config.name, "url": s.url} for s in sims],
        # Affinity off: this is about the strategy, not about where the model is loaded.
        balancer={"strategy": strategy, "model_affinity": False},
    )
    check = leak_check(corral, [s.port for s in sims])
    slow.set_faults(slow_s=0.45)  # ~0.05 s per answer on the fast ones, ~0.5 s here

    outcomes = run_load(corral.url, 90, workers=6)

    assert_all_clear(outcomes)
    assert all(o.verdict == "complete" for o in outcomes), [
        str(o) for o in outcomes if o.verdict != "complete"
    ]
    served = Counter(o.backend for o in outcomes)
    assert served["slow"] >= 1, served
    assert served["slow"] <= len(outcomes) * 0.2, served
    assert served["fast1"] > served["slow"], served
    assert served["fast2"] > served["slow"], served
    entry = loads(corral)["slow"]
    assert entry["available"], entry
    assert entry["failures"] == 0, entry
    check.assert_clean()
