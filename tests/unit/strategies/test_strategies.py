"""Strategies: one contract over every registered strategy, then a small table per strategy."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from corral.errors import UnknownStrategyError
from corral.strategies import (
    STRATEGIES,
    Candidate,
    RequestInfo,
    Strategy,
    create_strategy,
    strategy_names,
    weight_for_vram,
)
from corral.strategies.score import Score

REQ = RequestInfo(model="llama3", route="/api/generate")
GB = 10**9
GIB = 2**30


def picks(strategy: Strategy, candidates: Sequence[Candidate], n: int) -> Counter[str]:
    return Counter(strategy.select(candidates, REQ).id for _ in range(n))


def varied(i: int) -> list[Candidate]:
    """A candidate set that changes from call to call, never empty."""
    pool = [
        Candidate("a", weight=3.0, in_flight=i % 3, total_requests=i, ewma_ttft_s=0.2),
        Candidate("b", weight=1.0, in_flight=1, max_concurrent=0, total_requests=5),
        Candidate("c", weight=1.5, ewma_ttft_s=None, success_rate=0.5, availability=0.9),
        Candidate("d", weight=0.0, in_flight=7, max_concurrent=8, ewma_ttft_s=1.3),
    ]
    kept = [c for j, c in enumerate(pool) if (i >> j) & 1]
    return kept or [pool[i % len(pool)]]


# --- contract, every registered strategy ---------------------------------------------------


@pytest.fixture(params=sorted(STRATEGIES))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_registered_name_matches_class_name_attribute(name: str) -> None:
    """Each strategy is registered under its own ``name``."""
    strategy = create_strategy(name, rng=random.Random(0))
    assert strategy.name == name
    assert STRATEGIES[name].name == name


def test_returns_one_of_the_given_candidates(name: str) -> None:
    """select returns one of the candidates it was given, the same object."""
    strategy = create_strategy(name, rng=random.Random(1))
    candidates = varied(0b1111)
    for _ in range(20):
        chosen = strategy.select(candidates, REQ)
        assert any(chosen is c for c in candidates)


def test_single_candidate_is_always_chosen(name: str) -> None:
    """With one eligible backend, that backend is chosen every time."""
    strategy = create_strategy(name, rng=random.Random(2))
    only = [Candidate("solo", in_flight=3, ewma_ttft_s=2.0)]
    assert picks(strategy, only, 10) == Counter({"solo": 10})


def test_copes_with_candidates_changing_between_calls(name: str) -> None:
    """Backends joining and leaving between calls never break a strategy."""
    strategy = create_strategy(name, rng=random.Random(3))
    for i in range(1, 200):
        candidates = varied(i)
        assert strategy.select(candidates, REQ) in candidates


def test_deterministic_with_seeded_rng(name: str) -> None:
    """Two instances seeded alike make the same choices over the same inputs."""
    first = create_strategy(name, rng=random.Random(42))
    second = create_strategy(name, rng=random.Random(42))
    for i in range(1, 200):
        candidates = varied(i)
        assert first.select(candidates, REQ).id == second.select(candidates, REQ).id


def test_does_not_mutate_or_reorder_the_candidates(name: str) -> None:
    """The candidate sequence handed in is left as it was."""
    strategy = create_strategy(name, rng=random.Random(4))
    candidates = varied(0b1111)
    before = list(candidates)
    strategy.select(candidates, REQ)
    assert candidates == before


# --- registry ------------------------------------------------------------------------------


def test_registry_holds_the_documented_names() -> None:
    """The six product strategies are registered under their seed-compatible names."""
    assert strategy_names() == [
        "equal_weighted",
        "least_connections",
        "least_response_time",
        "round_robin",
        "score",
        "weighted_round_robin",
    ]


def test_unknown_name_error_lists_the_known_names() -> None:
    """An unknown strategy name raises an error naming every known strategy."""
    with pytest.raises(UnknownStrategyError) as info:
        create_strategy("fastest_please")
    assert info.value.name == "fastest_please"
    assert info.value.known == strategy_names()
    for known in strategy_names():
        assert known in str(info.value)


def test_unknown_name_error_is_a_value_error() -> None:
    """Callers validating config can catch the unknown-name error as a ValueError."""
    with pytest.raises(ValueError, match="round_robin"):
        create_strategy("")


def test_score_weights_reach_the_score_strategy() -> None:
    """create_strategy passes configured score weights to ``score``."""
    strategy = create_strategy("score", score_weights=(0.0, 0.0, 1.0))
    assert isinstance(strategy, Score)
    assert strategy.weights == (0.0, 0.0, 1.0)


def test_score_weights_are_ignored_by_other_strategies() -> None:
    """Other strategies accept (and ignore) score weights, so callers can always pass them."""
    strategy = create_strategy("round_robin", score_weights=(1.0, 1.0, 1.0))
    assert strategy.name == "round_robin"


@pytest.mark.parametrize("weights", [(-1.0, 0.5, 0.5), (0.0, 0.0, 0.0), (float("nan"), 1, 1)])
def test_invalid_score_weights_are_rejected(weights: tuple[float, float, float]) -> None:
    """Negative, non-finite or all-zero score weights are refused at construction."""
    with pytest.raises(ValueError, match="score weights"):
        create_strategy("score", score_weights=weights)


# --- round_robin ---------------------------------------------------------------------------


def test_round_robin_is_even_over_three_backends() -> None:
    """300 picks over 3 backends give each 100 ± 1."""
    counts = picks(create_strategy("round_robin"), [Candidate(x) for x in "abc"], 300)
    assert set(counts) == {"a", "b", "c"}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_round_robin_goes_in_circular_id_order() -> None:
    """Picks follow id order and wrap around, whatever order the candidates arrive in."""
    strategy = create_strategy("round_robin")
    candidates = [Candidate("c"), Candidate("a"), Candidate("b")]
    assert [strategy.select(candidates, REQ).id for _ in range(5)] == ["a", "b", "c", "a", "b"]


def test_round_robin_continues_after_the_last_id_when_the_set_changes() -> None:
    """A backend leaving or joining does not reset the rotation."""
    strategy = create_strategy("round_robin")
    assert strategy.select([Candidate("a"), Candidate("b"), Candidate("c")], REQ).id == "a"
    assert strategy.select([Candidate("a"), Candidate("c")], REQ).id == "c"
    assert strategy.select([Candidate("a"), Candidate("b"), Candidate("d")], REQ).id == "d"
    assert strategy.select([Candidate("a"), Candidate("b"), Candidate("d")], REQ).id == "a"


# --- weighted_round_robin ------------------------------------------------------------------


def test_weighted_round_robin_three_to_one_is_exact() -> None:
    """Weights 3:1 give exactly 300/100 over 400 picks."""
    candidates = [Candidate("big", weight=3.0), Candidate("small", weight=1.0)]
    counts = picks(create_strategy("weighted_round_robin"), candidates, 400)
    assert counts == Counter({"big": 300, "small": 100})


def test_weighted_round_robin_is_smooth() -> None:
    """Smooth WRR interleaves: 3:1 repeats big, big, small, big (nginx's sequence)."""
    strategy = create_strategy("weighted_round_robin")
    candidates = [Candidate("big", weight=3.0), Candidate("small", weight=1.0)]
    seq = [strategy.select(candidates, REQ).id for _ in range(8)]
    assert seq == ["big", "big", "small", "big"] * 2


def test_weighted_round_robin_follows_vram_weights() -> None:
    """An 80 GB, a 40 GB and a 16 GB card share picks 3 : 2 : 1."""
    candidates = [
        Candidate("h100", weight=weight_for_vram(80 * GIB)),
        Candidate("a100", weight=weight_for_vram(40 * GIB)),
        Candidate("t4", weight=weight_for_vram(16 * GIB)),
    ]
    counts = picks(create_strategy("weighted_round_robin"), candidates, 600)
    assert counts == Counter({"h100": 300, "a100": 200, "t4": 100})


def test_weighted_round_robin_zero_weight_is_never_chosen_beside_weighted_ones() -> None:
    """A weight-0 backend gets nothing while a weighted one is eligible."""
    candidates = [Candidate("on", weight=1.0), Candidate("off", weight=0.0)]
    assert picks(create_strategy("weighted_round_robin"), candidates, 50) == Counter({"on": 50})


def test_weighted_round_robin_all_zero_weights_count_as_equal() -> None:
    """When every weight is 0, backends alternate as if weighted equally."""
    candidates = [Candidate("a", weight=0.0), Candidate("b", weight=0.0)]
    counts = picks(create_strategy("weighted_round_robin"), candidates, 10)
    assert counts == Counter({"a": 5, "b": 5})


def test_weighted_round_robin_keeps_ratio_after_a_backend_leaves_and_returns() -> None:
    """After a backend drops out and comes back, the 3:1 ratio resumes."""
    strategy = create_strategy("weighted_round_robin")
    both = [Candidate("big", weight=3.0), Candidate("small", weight=1.0)]
    picks(strategy, both, 3)
    assert picks(strategy, [Candidate("big", weight=3.0)], 5) == Counter({"big": 5})
    assert picks(strategy, both, 400) == Counter({"big": 300, "small": 100})


@pytest.mark.parametrize(
    ("total_bytes", "weight"),
    [
        (None, 1.0),
        (0, 1.0),
        (16 * GIB, 1.0),
        (24 * GB - 1, 1.0),
        (24 * GB, 1.5),
        (23_034 * 2**20, 1.5),  # NVIDIA L4 "24 GB"
        (24 * GIB, 1.5),  # RTX 4090: 25.7e9 bytes
        (40 * GB - 1, 1.5),
        (40 * GB, 2.0),
        (48 * GIB, 2.0),
        (80 * GB - 1, 2.0),
        (80 * GB, 3.0),
        (81_559 * 2**20, 3.0),  # H100 80 GB
        (141 * GB, 3.0),
    ],
)
def test_weight_for_vram_tiers(total_bytes: int | None, weight: float) -> None:
    """VRAM tiers use decimal GB: 80+ → 3.0, 40+ → 2.0, 24+ → 1.5, else or unknown → 1.0."""
    assert weight_for_vram(total_bytes) == weight


# --- equal_weighted ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("totals", "expected"),
    [
        ({"a": 10, "b": 3, "c": 7}, "b"),
        ({"a": 0, "b": 1}, "a"),
        ({"a": 1_000_000, "b": 999_999}, "b"),
    ],
)
def test_equal_weighted_picks_fewest_total_requests(totals: dict[str, int], expected: str) -> None:
    """The backend that has served the fewest requests in its lifetime is chosen."""
    candidates = [Candidate(i, total_requests=t) for i, t in totals.items()]
    assert create_strategy("equal_weighted").select(candidates, REQ).id == expected


def test_equal_weighted_ignores_load_and_weight() -> None:
    """Only lifetime totals count, not in-flight load or weight."""
    candidates = [
        Candidate("busy", in_flight=4, weight=0.5, total_requests=1),
        Candidate("idle", in_flight=0, weight=3.0, total_requests=2),
    ]
    assert create_strategy("equal_weighted").select(candidates, REQ).id == "busy"


def test_equal_weighted_rotates_among_ties() -> None:
    """Equal totals (e.g. stale snapshots during a burst) are shared out in turn."""
    candidates = [Candidate(x, total_requests=5) for x in "abc"]
    assert picks(create_strategy("equal_weighted"), candidates, 30) == Counter(
        {"a": 10, "b": 10, "c": 10}
    )


def test_equal_weighted_evens_out_totals_as_they_grow() -> None:
    """Feeding picks back into totals, a newcomer catches up and then everyone stays level."""
    strategy = create_strategy("equal_weighted")
    totals = {"old": 20, "new": 0}
    for _ in range(60):
        chosen = strategy.select([Candidate(i, total_requests=t) for i, t in totals.items()], REQ)
        totals[chosen.id] += 1
    assert totals == {"old": 40, "new": 40}


# --- least_connections ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        # id: (in_flight, max_concurrent)
        ({"streaming": (4, 4), "free": (1, 4)}, "free"),
        ({"small-full": (2, 2), "big-busy": (3, 8)}, "big-busy"),
        ({"a": (1, 2), "b": (3, 4)}, "a"),
        ({"zero-slots": (1, 0), "half": (1, 2)}, "half"),
        ({"neg-slots": (0, -3), "one": (1, 4)}, "neg-slots"),
    ],
)
def test_least_connections_lowest_in_flight_per_slot(
    loads: dict[str, tuple[int, int]], expected: str
) -> None:
    """The backend with the fewest in-flight requests per slot wins (max_concurrent ≤ 0 → 1)."""
    candidates = [Candidate(i, in_flight=f, max_concurrent=m) for i, (f, m) in loads.items()]
    strategy = create_strategy("least_connections", rng=random.Random(0))
    assert strategy.select(candidates, REQ).id == expected


def test_least_connections_avoids_backend_holding_long_streams() -> None:
    """A backend whose slots are tied up by long streams gets no new work while others idle."""
    candidates = [
        Candidate("streams", in_flight=6, max_concurrent=8),
        Candidate("idle-1", in_flight=0, max_concurrent=4),
        Candidate("idle-2", in_flight=0, max_concurrent=4),
    ]
    counts = picks(create_strategy("least_connections", rng=random.Random(5)), candidates, 200)
    assert counts["streams"] == 0
    assert counts["idle-1"] > 60
    assert counts["idle-2"] > 60


def test_least_connections_breaks_ties_with_the_injected_rng() -> None:
    """Tied backends are chosen by the injected rng, and seeds reproduce the choice."""
    candidates = [Candidate(x) for x in "abcd"]
    counts = picks(create_strategy("least_connections", rng=random.Random(6)), candidates, 400)
    assert set(counts) == set("abcd")
    seq_1 = picks(create_strategy("least_connections", rng=random.Random(7)), candidates, 50)
    seq_2 = picks(create_strategy("least_connections", rng=random.Random(7)), candidates, 50)
    assert seq_1 == seq_2


# --- least_response_time -------------------------------------------------------------------


def test_least_response_time_prefers_the_fast_backend() -> None:
    """Of an idle fast and an idle slow backend, the fast one is chosen."""
    candidates = [Candidate("slow", ewma_ttft_s=2.0), Candidate("fast", ewma_ttft_s=0.25)]
    counts = picks(create_strategy("least_response_time", rng=random.Random(0)), candidates, 20)
    assert counts == Counter({"fast": 20})


@pytest.mark.parametrize(
    ("fast_in_flight", "expected"),
    [(0, "fast"), (3, "fast"), (6, "fast"), (8, "slow"), (20, "slow")],
)
def test_least_response_time_weighs_speed_by_load(fast_in_flight: int, expected: str) -> None:
    """ewma * (in_flight + 1): a backend 8 times quicker loses once 8 requests are on it."""
    candidates = [
        Candidate("fast", ewma_ttft_s=0.25, in_flight=fast_in_flight, max_concurrent=32),
        Candidate("slow", ewma_ttft_s=2.0, in_flight=0),
    ]
    strategy = create_strategy("least_response_time", rng=random.Random(0))
    assert strategy.select(candidates, REQ).id == expected


def test_least_response_time_tries_untried_backends_first() -> None:
    """A backend never measured is chosen before any measured one, however fast."""
    candidates = [Candidate("fast", ewma_ttft_s=0.01), Candidate("new", ewma_ttft_s=None)]
    strategy = create_strategy("least_response_time", rng=random.Random(0))
    assert strategy.select(candidates, REQ).id == "new"


def test_least_response_time_among_untried_prefers_fewest_in_flight() -> None:
    """Among untried backends, the one with the fewest requests in flight goes first."""
    candidates = [
        Candidate("new-busy", ewma_ttft_s=None, in_flight=2),
        Candidate("new-idle", ewma_ttft_s=None, in_flight=0),
        Candidate("known", ewma_ttft_s=0.1),
    ]
    strategy = create_strategy("least_response_time", rng=random.Random(0))
    assert strategy.select(candidates, REQ).id == "new-idle"


def test_least_response_time_breaks_ties_with_the_injected_rng() -> None:
    """Untried, equally loaded backends are drawn at random: all get picked."""
    candidates = [Candidate(x) for x in "abc"]
    counts = picks(create_strategy("least_response_time", rng=random.Random(8)), candidates, 300)
    assert set(counts) == set("abc")


# --- score ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        (
            Candidate("roomy", max_concurrent=8, in_flight=2),
            Candidate("tight", max_concurrent=2, in_flight=1),
        ),
        (Candidate("ok", success_rate=1.0), Candidate("failing", success_rate=0.2)),
        (Candidate("fast", ewma_ttft_s=0.2), Candidate("slow", ewma_ttft_s=1.0)),
        (Candidate("idle", in_flight=0), Candidate("busy", in_flight=4)),
    ],
)
def test_score_prefers_available_successful_fast_idle(better: Candidate, worse: Candidate) -> None:
    """All else equal, more free slots, more success, more speed or less load wins."""
    strategy = create_strategy("score", rng=random.Random(0))
    assert strategy.select([worse, better], REQ) is better
    assert strategy.select([better, worse], REQ) is better


def test_score_default_weights_favour_availability_over_speed() -> None:
    """With 0.5/0.3/0.2, a roomy reliable backend 3 times slower beats a busy, flaky fast one."""
    reliable = Candidate("reliable", in_flight=0, success_rate=1.0, ewma_ttft_s=0.9)
    flaky = Candidate("flaky", in_flight=3, success_rate=0.9, ewma_ttft_s=0.3)
    # reliable: 0.5 + 0.3 + 0.2/3 = 0.867; flaky: 0.5/4 + 0.27 + 0.2 = 0.595
    assert create_strategy("score").select([flaky, reliable], REQ) is reliable


def test_score_weights_change_the_choice() -> None:
    """Weighting speed alone makes the fast, flaky backend the choice."""
    reliable = Candidate("reliable", in_flight=0, success_rate=1.0, ewma_ttft_s=0.9)
    flaky = Candidate("flaky", in_flight=3, success_rate=0.9, ewma_ttft_s=0.3)
    strategy = create_strategy("score", score_weights=(0.0, 0.0, 1.0))
    assert strategy.select([reliable, flaky], REQ) is flaky


def test_score_untried_backend_counts_as_fast() -> None:
    """An untried backend gets full speed credit: it ties the fastest and beats slower ones."""
    slow = Candidate("slow", ewma_ttft_s=1.0)
    fastest = Candidate("fastest", ewma_ttft_s=0.5)
    untried = Candidate("untried", ewma_ttft_s=None)
    candidates = [slow, fastest, untried]
    counts = picks(create_strategy("score", rng=random.Random(1)), candidates, 100)
    assert counts["slow"] == 0
    assert counts["fastest"] > 20
    assert counts["untried"] > 20


def test_score_load_keeps_the_best_backend_from_taking_everything() -> None:
    """Once the best backend is loaded enough, a slightly worse idle one wins."""
    best_idle = Candidate("best", ewma_ttft_s=0.5, in_flight=0, max_concurrent=4)
    best_busy = Candidate("best", ewma_ttft_s=0.5, in_flight=2, max_concurrent=4)
    second = Candidate("second", ewma_ttft_s=1.0, in_flight=0, max_concurrent=4)
    strategy = create_strategy("score")
    assert strategy.select([best_idle, second], REQ) is best_idle
    assert strategy.select([best_busy, second], REQ) is second


def test_score_ties_are_broken_at_random() -> None:
    """Identical backends share the load through the injected rng."""
    counts = picks(
        create_strategy("score", rng=random.Random(9)), [Candidate(x) for x in "ab"], 200
    )
    assert 60 < counts["a"] < 140


def test_the_configuration_knows_every_registered_strategy() -> None:
    """`balancer.strategy` accepts exactly the strategies corral has (and lists them when not)."""
    from corral.config import STRATEGY_NAMES

    assert tuple(strategy_names()) == STRATEGY_NAMES
