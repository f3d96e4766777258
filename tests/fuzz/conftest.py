"""The fuzz harness: corral driven in-process over raw ASGI, a simulator behind it, and the
hypothesis profiles.

Requests are handed to the ASGI app as scopes and messages, not through an HTTP client, so a
test can send what a client library would refuse to (any header bytes, a Content-Length that
lies, a body in odd chunks) and can tell an exception that escaped the app (the server would
answer 500 and log a traceback) from a response. The app runs with its lifespan on its own
event loop in a thread, as under uvicorn, so the health loop keeps running between examples;
its backend is a simulator process on loopback.

Profiles: ``ci`` (the default) is derandomized and keeps no example database, so every run
tries the same inputs; ``HYPOTHESIS_PROFILE=dev`` tries about eight times as many, at random,
to hunt for new failures.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from corral.app import CorralApp, create_app
from corral.config import load_config
from corral.sim.harness import SimProcess

_COMMON: dict[str, Any] = {
    "deadline": None,  # one example is one HTTP exchange; its time is the harness's concern
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=120, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ADMIN_KEY = "fuzz-admin-key-0123456789"
# Small, so that bodies at and just over the limit stay cheap to build and send.
MAX_BODY_BYTES = 64_000
# A request that takes longer than this has hung: the simulator answers in milliseconds.
CALL_TIMEOUT_S = 15.0


def examples(share: float) -> int:
    """``share`` of the profile's example count (at least 5): each test weighs its share by
    how much there is to explore and what one example costs."""
    return max(5, int(settings().max_examples * share))


@dataclass
class Reply:
    """What the app sent back for one request."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool  # the last body message said more_body: False

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass
class _Exchange:
    started: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False


class AsgiHarness:
    """A corral app on a private event loop (thread), called with hand-built ASGI scopes."""

    def __init__(self, app: CorralApp) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._lifespan_in: asyncio.Queue[dict[str, Any]] | None = None
        self._lifespan_out: asyncio.Queue[dict[str, Any]] | None = None
        self._lifespan_task: asyncio.Task[None] | None = None

    @property
    def runtime(self) -> Any:
        return self.app.runtime

    def _run(self, coro: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self) -> AsgiHarness:
        self._thread.start()
        self._run(self._startup())
        return self

    def stop(self) -> None:
        self._run(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    async def _startup(self) -> None:
        self._lifespan_in = asyncio.Queue()
        self._lifespan_out = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan_task = asyncio.create_task(
            self.app(scope, self._lifespan_in.get, self._lifespan_out.put)
        )
        await self._lifespan_in.put({"type": "lifespan.startup"})
        message = await self._lifespan_out.get()
        assert message["type"] == "lifespan.startup.complete", message

    async def _shutdown(self) -> None:
        assert self._lifespan_in is not None
        assert self._lifespan_out is not None
        await self._lifespan_in.put({"type": "lifespan.shutdown"})
        message = await self._lifespan_out.get()
        assert message["type"] == "lifespan.shutdown.complete", message
        assert self._lifespan_task is not None
        await self._lifespan_task

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | list[bytes] = b"",
        query: bytes = b"",
        client: tuple[str, int] = ("127.0.0.1", 50000),
    ) -> Reply:
        """One request; raises what the app raised, fails when it hangs or answers twice."""
        parts = body if isinstance(body, list) else [body]
        return self._run(self._call(method, path, headers or [], parts, query, client))

    def call(self, fn: Any) -> Any:
        """``fn()`` on the app's loop (live state belongs to it)."""

        async def run() -> Any:
            return fn()

        return self._run(run())

    async def _call(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        parts: list[bytes],
        query: bytes,
        client: tuple[str, int],
    ) -> Reply:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("utf-8", "surrogateescape"),
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": client,
            "server": ("127.0.0.1", 11434),
            "state": {},
        }
        exchange = _Exchange()
        finished = asyncio.Event()
        pending = list(parts)

        async def receive() -> dict[str, Any]:
            if pending:
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            # As a server does: the client is there until the response is over.
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            assert not exchange.complete, f"message after the response ended: {message}"
            if message["type"] == "http.response.start":
                assert not exchange.started, "http.response.start sent twice"
                exchange.started.append(message)
            elif message["type"] == "http.response.body":
                assert exchange.started, "body before http.response.start"
                exchange.chunks.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    exchange.complete = True
                    finished.set()
            else:
                raise AssertionError(f"unexpected ASGI message {message['type']}")

        try:
            await asyncio.wait_for(self.app(scope, receive, send), CALL_TIMEOUT_S - 1)
        finally:
            finished.set()
        assert exchange.started, f"{method} {path}: the app returned without answering"
        start = exchange.started[0]
        names = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in start["headers"]]
        return Reply(start["status"], dict(names), b"".join(exchange.chunks), exchange.complete)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    """A simulated Ollama in its own process: in a thread of this one it would share the GIL
    with corral and the test, and every request would take ten times as long."""
    backend = SimProcess(name="fuzz-sim").start()
    yield backend
    backend.stop()


def start_corral(backend_url: str, *, admin_key: str | None) -> AsgiHarness:
    """corral (lifespan started) in front of one backend; ``admin_key`` None: loopback only."""
    overrides: dict[str, Any] = {
        # docs: the fuzzer reads the admin API's schema from /openapi.json.
        "server": {"max_body_mb": MAX_BODY_BYTES / 1_000_000, "drain_timeout_s": 1, "docs": True},
        # Probes at the start and on demand only: no example may depend on a probe's timing.
        # No ejection by error rate: the simulator, like Ollama, answers some bad requests
        # with a 500, and the only backend would leave the rotation halfway through a run.
        "health": {"interval_s": 60, "timeout_s": 2, "error_min_requests": 1_000_000},
        "backends": [{"id": "sim", "url": backend_url}],
    }
    env = {"CORRAL_ADMIN_KEY": admin_key} if admin_key is not None else {}
    return AsgiHarness(create_app(load_config(None, overrides=overrides, env=env))).start()
