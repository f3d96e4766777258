"""Model lists from backends that answer oddly: probes keep what is well-formed, skip and
count the rest, and never crash or mark models wrongly."""

from __future__ import annotations

from typing import Any

import pytest

from corral.errors import UpstreamBadBodyError
from corral.fleet import inventory
from corral.fleet.backends import BackendRegistry
from corral.fleet.health import HealthChecker
from corral.metrics import Metrics
from corral.upstream import Upstream
from tests.helpers import Answer, FakeTransport, backend, offline_settings

URL = "http://127.0.0.1:1/a"
GOOD = {"name": "good:latest", "model": "good:latest", "size": 10, "size_vram": 10}

ODD_ENTRIES = [
    ["a", "list"],
    "a string",
    7,
    None,
    {"name": 42},
    {"name": ["x"]},
    {"model": {"nested": True}},
    {"name": ""},
    {"name": "n" * 1000},
    {"name": "s:latest", "size": "4GB"},
    {"name": "b:latest", "size": True},
    {"name": "v:latest", "size_vram": -1},
]


@pytest.mark.parametrize("odd", ODD_ENTRIES, ids=repr)
def test_odd_entries_are_skipped(odd: Any) -> None:
    """An entry without a string name, or with a size that is no count, is skipped and
    counted; the well-formed one next to it is taken."""
    b = backend("a")
    skipped = inventory.update(b, {"models": [odd, GOOD]}, {"models": [odd, GOOD]}, now=0.0)
    assert skipped == 2
    assert b.models == {"good:latest"}
    assert set(b.resident) == {"good:latest"}


@pytest.mark.parametrize(
    "answer", [[GOOD], "text", 12, {"models": "all"}, {"models": {"name": "x"}}], ids=repr
)
def test_an_answer_that_is_no_model_list_changes_nothing(answer: Any) -> None:
    """A tags or ps answer of the wrong shape raises UpstreamBadBodyError and leaves the
    backend's models as they were (not emptied)."""
    b = backend("a", "kept")
    b.resident = {"kept:latest": dict(GOOD, name="kept:latest")}
    with pytest.raises(UpstreamBadBodyError):
        inventory.update(b, answer, {"models": []})
    with pytest.raises(UpstreamBadBodyError):
        inventory.update(b, {"models": []}, answer)
    assert b.models == {"kept:latest"}
    assert set(b.resident) == {"kept:latest"}


@pytest.mark.parametrize("answer", [None, {}, {"models": None}, {"models": []}], ids=repr)
def test_no_models_is_an_empty_list(answer: Any) -> None:
    b = backend("a", "old")
    assert inventory.update(b, answer, answer) == 0
    assert b.models == set()


def test_version_of() -> None:
    """Versions that look like Ollama's are kept; anything else is None."""
    for good in ("0.12.3", "v0.5.0-rc2", "0.0.0", "0.6.8+local"):
        assert inventory.version_of({"version": good}) == good
    for odd in ("9" * 5000, "", "x1", "0.1 beta", 12, None, ["0.1"]):
        assert inventory.version_of({"version": odd}) is None
    assert inventory.version_of(["0.1"]) is None


def checker(fake: FakeTransport) -> tuple[HealthChecker, Metrics]:
    registry = BackendRegistry([backend("a")])
    metrics = Metrics()
    settings = offline_settings()
    upstream = Upstream(settings.timeouts, transport=fake)
    return HealthChecker(registry, upstream, settings.health, metrics), metrics


def malformed(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "corral_backend_malformed_total", {"backend": "a", "reason": reason}
    )
    return value or 0.0


async def test_probe_keeps_well_formed_models_and_counts_the_rest() -> None:
    """Odd entries in /api/tags and /api/ps: the probe succeeds with the good models, and the
    skipped entries are counted as ``bad_entry``."""
    fake = FakeTransport()
    fake.always(f"{URL}/api/version", Answer.json({"version": "0.9.0"}))
    fake.always(f"{URL}/api/tags", Answer.json({"models": [GOOD, {"name": 5}]}))
    fake.always(f"{URL}/api/ps", Answer.json({"models": [[1], {"name": "x", "size": "1"}]}))
    health, metrics = checker(fake)
    b = health.registry.get("a")
    assert await health.probe(b)
    assert b.models == {"good:latest"}
    assert b.resident == {}
    assert b.version == "0.9.0"
    assert malformed(metrics, "bad_entry") == 3


async def test_probe_with_an_absurd_version_keeps_the_backend_up() -> None:
    """A 5,000-digit version: the backend answers, so it is up; its version is unknown."""
    fake = FakeTransport().ollama(URL, "m")
    fake.always(f"{URL}/api/version", Answer.json({"version": "9" * 5000}))
    health, metrics = checker(fake)
    b = health.registry.get("a")
    assert await health.probe(b)
    assert b.version is None
    assert malformed(metrics, "bad_entry") == 1


async def test_probe_with_a_tags_answer_of_the_wrong_shape_fails_and_keeps_models() -> None:
    """/api/tags answering a list: the probe fails, the models corral knew stay as they were."""
    fake = FakeTransport().ollama(URL, "m")
    fake.always(f"{URL}/api/tags", Answer.json(["m"]))
    health, metrics = checker(fake)
    b = health.registry.get("a")
    b.models = {"kept:latest"}
    assert not await health.probe(b)
    assert b.models == {"kept:latest"}
    assert malformed(metrics, "bad_entry") == 1


async def test_probe_of_a_body_over_the_cap_fails_and_is_counted() -> None:
    """An /api/tags bigger than corral's cap (8 MiB): the probe fails, counted ``too_large``."""
    chunk = b"x" * (1 << 20)
    fake = FakeTransport().ollama(URL, "m")
    fake.always(f"{URL}/api/tags", Answer(200, [chunk] * 9))
    health, metrics = checker(fake)
    assert not await health.probe(health.registry.get("a"))
    assert malformed(metrics, "too_large") == 1


def test_a_backend_claiming_thousands_of_loaded_models_is_believed_only_so_far() -> None:
    """corral_model_resident stays bounded: at most MAX_RESIDENT loaded models per backend."""
    from corral.fleet.backends import BackendState
    from corral.fleet.inventory import MAX_RESIDENT, ResidencyCollector

    backend = BackendState(id="a", url="http://127.0.0.1:1")
    ps = {"models": [{"name": f"m{i}", "size": 10, "size_vram": 10} for i in range(100_000)]}
    inventory.update(backend, {"models": []}, ps)
    assert len(backend.resident) == MAX_RESIDENT
    [family] = ResidencyCollector(BackendRegistry([backend])).collect()
    assert len(family.samples) == MAX_RESIDENT
