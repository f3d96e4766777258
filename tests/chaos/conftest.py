"""Fixtures of the chaos suite: corral with its timings, and a leak check with its baseline."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import pytest

from tests.chaos.leaks import LeakCheck
from tests.chaos.support import CHAOS_SECTIONS, ROTATION, wait_healthy


@pytest.fixture
def chaos_corral(corral_factory: Any) -> Callable[..., Any]:
    """``chaos_corral(backends, **sections)``: corral with the chaos timings, every backend up."""

    def start(backends: list[dict[str, Any]], **sections: dict[str, Any]) -> Any:
        merged = {key: dict(value) for key, value in CHAOS_SECTIONS.items()}
        for key, value in sections.items():
            merged.setdefault(key, {}).update(value)
        corral = corral_factory(backends, **merged)
        wait_healthy(corral, [b["id"] for b in backends])
        return corral

    return start


@pytest.fixture
def leak_check() -> Callable[..., LeakCheck]:
    """``leak_check(corral, backend_ports)``: a :class:`LeakCheck` with its baseline taken."""

    def make(corral: Any, backend_ports: Iterable[int]) -> LeakCheck:
        check = LeakCheck(corral, backend_ports)
        check.take_baseline()
        return check

    return make


class Pair(NamedTuple):
    """Simulators "a" and "b" behind corral, and the leak check on that corral."""

    a: Any
    b: Any
    corral: Any
    check: LeakCheck


@pytest.fixture
def pair(chaos_corral: Any, leak_check: Any) -> Callable[..., Pair]:
    """``pair(factory, timing, **sections)``: simulators "a" and "b" from ``factory``
    (``sim_factory`` or ``sim_process_factory``) behind corral in plain rotation."""

    def start(factory: Any, timing: dict[str, Any], **sections: dict[str, Any]) -> Pair:
        a = factory(name="a", **timing)
        b = factory(name="b", **timing)
        sections.setdefault("balancer", ROTATION)
        corral = chaos_corral([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}], **sections)
        return Pair(a, b, corral, leak_check(corral, [a.port, b.port]))

    return start
