"""Helpers shared across the test suite (fixtures stay in the conftest.py files).

- Paths: :data:`REPO_ROOT`, :data:`TESTS_DIR`, :data:`DATA_DIR`, so no test counts ``parents[...]``.
- Sockets and waiting: :func:`free_port`, :func:`poll` (sync), :func:`until` (async).
- corral in-process: :class:`CorralThread` (under uvicorn on a free loopback port) and
  :func:`make_settings` (a :class:`~corral.config.Settings` for N backends); talking to it:
  :func:`served_by`, :func:`loads`, :func:`warm`.
- Without sockets: :class:`FakeClock`, :func:`backend` and :func:`loaded` (a ``BackendState``).
- Reading answers: :func:`metric` (a live ``/metrics``), :func:`counter` (a ``Metrics``
  registry), :func:`ndjson` (a streamed body's lines).
- The simulator's CLI: :func:`sim_cli`.
- System tools: :func:`require_tool`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import uvicorn
from typer.testing import CliRunner, Result

from corral.app import CorralApp, create_app
from corral.config import Settings, load_config
from corral.fleet.backends import BackendState, normalize_model
from corral.metrics import Metrics
from corral.sim.cli import sim_command

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
DATA_DIR = TESTS_DIR / "data"


# Sockets and waiting ------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on (bound once by the OS, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(predicate: Any, timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


async def until(check: Callable[[], Any], timeout_s: float = 2.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; fail after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# corral in-process --------------------------------------------------------------------------


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
    """Settings for ``backends`` on a free port with fast health checks; ``sections`` are
    merged over those defaults section by section."""
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


def served_by(
    client: httpx.Client, body: dict[str, Any], n: int = 1, **headers: str
) -> Counter[str]:
    """Send ``body`` ``n`` times (to /api/chat when it has messages, else /api/generate, not
    streamed); each must answer 200. How many each backend served (``X-Corral-Backend``)."""
    got: Counter[str] = Counter()
    for _ in range(n):
        path = "/api/chat" if "messages" in body else "/api/generate"
        resp = client.post(path, json={"stream": False, **body}, headers=headers)
        assert resp.status_code == 200, resp.text
        got[resp.headers["x-corral-backend"]] += 1
    return got


def loads(client: httpx.Client) -> dict[str, Any]:
    """The admin API's per-backend loads."""
    data: dict[str, Any] = client.get("/api/v1/loadbalancer/loads").json()["loads"]
    return data


def warm(client: httpx.Client, model: str, *sims: Any) -> None:
    """Load ``model`` on every sim directly, and wait until corral sees it resident on each."""
    for sim in sims:
        with httpx.Client(base_url=sim.url, timeout=10) as direct:
            direct.post("/api/generate", json={"model": model, "prompt": "", "stream": False})
    key = model if ":" in model else f"{model}:latest"
    urls = {sim.url for sim in sims}

    def seen() -> bool:
        return all(key in e["resident"] for e in loads(client).values() if e["url"] in urls)

    assert poll(seen, 5)


# Without sockets ----------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand: ``clock.now += 5``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def backend(bid: str, *models: str, **kw: Any) -> BackendState:
    """A healthy, probed backend with ``models`` installed."""
    b = BackendState(id=bid, url=f"http://127.0.0.1:1/{bid}", **kw)
    b.healthy = True
    b.probed = True
    b.models = {normalize_model(m) for m in models}
    return b


def loaded(b: BackendState, *models: str, size: int = 2_000_000_000) -> BackendState:
    """Mark ``models`` as loaded all on GPU on ``b`` (as its /api/ps would show them)."""
    for m in models:
        b.resident[normalize_model(m)] = {"name": m, "size": size, "size_vram": size}
    return b


# Reading answers ----------------------------------------------------------------------------


def metric(client: httpx.Client, prefix: str) -> float:
    """The sum of the samples on a live ``/metrics`` whose line starts with ``prefix``."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def counter(metrics: Metrics, name: str, backend_id: str) -> float:
    """One backend's sample of ``name`` in a ``Metrics`` registry (0 when absent)."""
    return metrics.registry.get_sample_value(name, {"backend": backend_id}) or 0.0


def ndjson(resp: httpx.Response) -> list[dict[str, Any]]:
    """The objects of an NDJSON body, one a non-blank line (a streamed response is read)."""
    return [json.loads(line) for line in resp.iter_lines() if line]


# The simulator's CLI ------------------------------------------------------------------------


def sim_cli(monkeypatch: pytest.MonkeyPatch) -> tuple[Callable[[list[str]], Result], list[Any]]:
    """``corral sim`` with serving stubbed out: a function that invokes it with some
    arguments, and the list of SimConfigs those invocations would have served."""
    seen: list[Any] = []
    monkeypatch.setattr("corral.sim.server.serve", lambda config, **kw: seen.append(config))
    cli = typer.Typer()
    cli.command()(sim_command)

    def invoke(args: list[str]) -> Result:
        return CliRunner().invoke(cli, args)

    return invoke, seen


# System tools -------------------------------------------------------------------------------


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
