"""PeakEwma: peak-sensitive, slowly decaying latency estimate, driven by a fake clock."""

from __future__ import annotations

import math

import pytest

from corral.strategies import PeakEwma
from tests.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_value_is_none_before_any_observation(clock: FakeClock) -> None:
    """An estimator that has seen nothing reports None (an untried backend)."""
    assert PeakEwma(clock=clock).value is None


def test_first_observation_is_adopted(clock: FakeClock) -> None:
    """The first latency seen becomes the estimate."""
    ewma = PeakEwma(clock=clock)
    ewma.observe(0.8)
    assert ewma.value == 0.8


def test_higher_value_is_adopted_immediately(clock: FakeClock) -> None:
    """A latency above the estimate replaces it at once, however little time passed."""
    ewma = PeakEwma(tau_s=10.0, clock=clock)
    ewma.observe(0.5)
    clock.now += 0.001
    ewma.observe(3.0)
    assert ewma.value == 3.0


def test_lower_value_decays_with_exp_of_elapsed_over_tau(clock: FakeClock) -> None:
    """After tau seconds a lower latency pulls the estimate 1 - 1/e of the way down."""
    ewma = PeakEwma(tau_s=10.0, clock=clock)
    ewma.observe(2.0)
    clock.now += 10.0
    ewma.observe(1.0)
    w = math.exp(-1.0)
    assert ewma.value == pytest.approx(2.0 * w + 1.0 * (1 - w))


def test_lower_value_at_the_same_instant_changes_nothing(clock: FakeClock) -> None:
    """With no time elapsed, a lower observation has weight 0: the peak holds."""
    ewma = PeakEwma(clock=clock)
    ewma.observe(2.0)
    ewma.observe(0.1)
    assert ewma.value == 2.0


def test_estimate_recovers_toward_steady_latency(clock: FakeClock) -> None:
    """After a spike, steady fast responses bring the estimate back down gradually."""
    ewma = PeakEwma(tau_s=10.0, clock=clock)
    ewma.observe(5.0)
    seen = []
    for _ in range(60):
        clock.now += 1.0
        ewma.observe(0.2)
        assert ewma.value is not None
        seen.append(ewma.value)
    assert seen == sorted(seen, reverse=True)
    assert seen[0] > 4.0
    assert seen[-1] == pytest.approx(0.2, abs=0.02)


def test_long_gap_makes_the_new_value_dominate(clock: FakeClock) -> None:
    """After a gap many times tau, a lower latency nearly replaces the old estimate."""
    ewma = PeakEwma(tau_s=1.0, clock=clock)
    ewma.observe(4.0)
    clock.now += 30.0
    ewma.observe(1.0)
    assert ewma.value == pytest.approx(1.0, abs=1e-9)


def test_estimate_does_not_change_without_observations(clock: FakeClock) -> None:
    """Reading the value does not decay it; only observations move it."""
    ewma = PeakEwma(clock=clock)
    ewma.observe(1.5)
    clock.now += 1_000.0
    assert ewma.value == 1.5


def test_clock_going_backwards_is_treated_as_no_time(clock: FakeClock) -> None:
    """A clock that steps back does not blow up the weight: it counts as zero elapsed."""
    ewma = PeakEwma(clock=clock)
    ewma.observe(2.0)
    clock.now -= 5.0
    ewma.observe(1.0)
    assert ewma.value == 2.0


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_rejects_negative_or_nan_latency(clock: FakeClock, bad: float) -> None:
    """A negative or NaN latency is a bug in the caller and is refused."""
    with pytest.raises(ValueError, match="latency"):
        PeakEwma(clock=clock).observe(bad)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_rejects_non_positive_tau(tau: float) -> None:
    """The decay time constant must be positive."""
    with pytest.raises(ValueError, match="tau_s"):
        PeakEwma(tau_s=tau)
