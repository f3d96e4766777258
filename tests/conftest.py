"""Shared fixtures: corral and simulated backends on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from corral.app import CorralApp, create_app
from corral.config import Settings, load_config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CorralThread:
    """corral under uvicorn on a background thread (own event loop), on a free port."""

    def __init__(self, settings: Settings, *, gpu_sampler: Any = None) -> None:
        self.settings = settings
        self.port = settings.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.app: CorralApp = create_app(settings, gpu_sampler=gpu_sampler)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            loop="asyncio",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_config=None,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    def __enter__(self) -> CorralThread:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("corral failed to start")
            self._thread.join(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(10)

    @property
    def runtime(self) -> Any:
        return self.app.runtime

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on corral's loop (to touch live state safely) and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)


def make_settings(backends: list[dict[str, Any]], **sections: dict[str, Any]) -> Settings:
    overrides: dict[str, Any] = {
        "server": {"port": free_port(), "log_level": "warning"},
        "health": {"interval_s": 0.2, "timeout_s": 1, "fall": 2, "rise": 1},
        "backends": backends,
    }
    for key, value in sections.items():
        merged = dict(overrides.get(key) or {})
        merged.update(value)
        overrides[key] = merged
    # Only the secrets come from the environment, so a developer's CORRAL_* never leaks in.
    env = {k: v for k, v in os.environ.items() if k in ("CORRAL_ADMIN_KEY", "CORRAL_CLIENT_KEYS")}
    return load_config(None, overrides=overrides, env=env)


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


def require_tool(name: str, needed_for: str, package: str) -> str:
    """The path of a system tool; skip without it, except under CI, where that fails: CI
    installs it (scripts/test-deps.sh), so a missing tool there is a broken set-up."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} not found, so {needed_for}; install Debian's {package} package "
            "(scripts/test-deps.sh does it as root)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
