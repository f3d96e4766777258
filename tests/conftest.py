"""Shared fixtures: corral and simulated backends on free loopback ports (the helpers they use
live in tests/helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import CorralThread, make_settings

# tests/integration/test_cli_live.py imports free_port from here.
from tests.helpers import free_port as free_port


@pytest.fixture
def corral_factory() -> Iterator[Any]:
    started: list[CorralThread] = []

    def start(
        backends: list[dict[str, Any]], *, gpu_sampler: Any = None, **sections: dict[str, Any]
    ) -> CorralThread:
        settings = make_settings(backends, **sections)
        server = CorralThread(settings, gpu_sampler=gpu_sampler).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:  # all at once: each takes a tenth of a second to wind down
        server.stop_soon()
    for server in reversed(started):
        server.__exit__(None, None, None)


@pytest.fixture
def sim_factory() -> Iterator[Any]:
    """Start simulated Ollama servers on background threads: ``sim_factory(name="a", ...)``."""
    from corral.sim.harness import SimThread

    started: list[Any] = []

    def start(**overrides: Any) -> Any:
        sim = SimThread(**overrides).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop_soon()
    for sim in reversed(started):
        sim.stop()


@pytest.fixture
def sim_process_factory() -> Iterator[Any]:
    """Start simulated Ollama servers as subprocesses (they can be SIGKILLed)."""
    from corral.sim.harness import SimProcess

    started: list[Any] = []

    def start(**options: Any) -> Any:
        sim = SimProcess(**options).start()
        started.append(sim)
        return sim

    yield start
    for sim in reversed(started):
        sim.stop()


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A real redis-server on a free loopback port (tests/cluster/conftest.py's RedisServer);
    skipped without one, except under CI, which installs it (scripts/test-deps.sh)."""
    from tests.cluster.conftest import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        reason = "redis-server is not installed (scripts/test-deps.sh installs Debian's)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = RedisServer(REDIS_SERVER).start()
    yield server
    server.stop()
