"""Helpers shared across the test suite (fixtures stay in the conftest.py files).

- Paths: :data:`REPO_ROOT`, :data:`TESTS_DIR`, :data:`DATA_DIR`, so no test counts ``parents[...]``.
- Sockets and waiting: :func:`free_port`, :func:`poll` (sync), :func:`until` (async).
- corral in-process: :class:`CorralThread` (under uvicorn on a free loopback port) and
  :func:`make_settings` (a :class:`~corral.config.Settings` for N backends); talking to it:
  :func:`served_by`, :func:`loads`, :func:`warm`.
- Without sockets: :class:`FakeClock`, :func:`backend` and :func:`loaded` (a ``BackendState``).
- Behind the upstream seam, without sockets: :class:`FakeTransport` (a scripted
  ``corral.upstream.Transport``: :class:`Answer`, :class:`Pause`, exceptions) and its
  :class:`FakeResponse`; :func:`offline_settings` (Settings that bind and probe nothing),
  :class:`RecordingSend` (an ASGI ``send`` that keeps what it got), :func:`asgi_client` (the app
  in-process with its lifespan running) and :func:`forbid_sockets`.
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
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
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
from corral.sim.harness import PromptServer
from corral.upstream import Body

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
            proxy_headers=False,  # as corral serve: corral reads forwarding headers itself
        )
        self.server = PromptServer(config)
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

    def stop_soon(self) -> None:
        """Ask it to stop; ``__exit__`` waits for it."""
        self.server.stop_soon()

    def __exit__(self, *exc: object) -> None:
        self.server.stop_soon()
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


# Behind the upstream seam, without sockets ---------------------------------------------------


class Pause:
    """A point where a scripted answer stops until the test says go: put it among an
    :class:`Answer`'s body chunks (or pass it as ``Answer(wait=...)`` to hold the headers back).

    ``await pause.reached.wait()`` returns once the reader got there; :meth:`release` lets it on.
    """

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._go = asyncio.Event()

    def release(self) -> None:
        self._go.set()

    async def wait(self) -> None:
        self.reached.set()
        await self._go.wait()


Chunk = bytes | BaseException | Pause


@dataclass
class Answer:
    """A scripted backend answer: status, headers and body chunks, read one per ``read()``.

    A chunk that is an exception is raised by the read that reaches it (an
    ``UpstreamBrokenError`` for a connection that broke mid-body, an ``UpstreamTimeoutError``
    for an idle timeout); a :class:`Pause` holds the reader until released. ``wait`` holds the
    headers back the same way."""

    status: int = 200
    body: Sequence[Chunk] = ()
    headers: Sequence[tuple[bytes | str, bytes | str]] = ()
    content_type: str | None = "application/json; charset=utf-8"
    wait: Pause | None = None

    @classmethod
    def json(cls, obj: Any, status: int = 200, **kw: Any) -> Answer:
        """One JSON object, in one chunk."""
        return cls(status, [json.dumps(obj).encode()], **kw)

    @classmethod
    def ndjson(cls, *items: Any, status: int = 200, **kw: Any) -> Answer:
        """A stream: each dict one NDJSON line in its own chunk; bytes, exceptions and pauses
        are taken as they are."""
        body = [json.dumps(i).encode() + b"\n" if isinstance(i, dict) else i for i in items]
        return cls(status, body, content_type="application/x-ndjson", **kw)

    def header_list(self) -> list[tuple[bytes, bytes]]:
        out = [(_b(k).lower(), _b(v)) for k, v in self.headers]
        if self.content_type is not None and not any(k == b"content-type" for k, _ in out):
            out.append((b"content-type", self.content_type.encode()))
        return out


def _b(text: bytes | str) -> bytes:
    return text if isinstance(text, bytes) else text.encode("latin-1")


# What one request to a URL does: answer, or raise at open (an exception instance or class).
Step = Answer | BaseException | type[BaseException]


@dataclass
class SentRequest:
    """One request the fake transport received."""

    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    headers_timeout_s: float | None
    idle_timeout_s: float | None

    @property
    def path(self) -> str:
        """The URL's path (and query), without scheme and host."""
        rest = self.url.split("://", 1)[-1]
        return "/" + rest.split("/", 1)[1] if "/" in rest else "/"

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k == key), None)

    def header_names(self) -> set[str]:
        return {k.decode("latin-1") for k, _ in self.headers}

    def json(self) -> Any:
        assert self.body is not None
        return json.loads(self.body)


class FakeResponse:
    """A scripted answer as a ``corral.upstream.Response``; ``closed`` once released."""

    def __init__(self, answer: Answer, url: str) -> None:
        self.url = url
        self.status = answer.status
        self.headers = answer.header_list()
        self._items: deque[Chunk] = deque(answer.body)
        self.closed = False
        self.reads = 0

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    async def read(self) -> bytes:
        assert not self.closed, f"read after close ({self.url})"
        self.reads += 1
        while self._items:
            item = self._items.popleft()
            if isinstance(item, Pause):
                await item.wait()
            elif isinstance(item, BaseException):
                raise item
            elif item:
                return item
        return b""

    def at_eof(self) -> bool:
        return not self._items

    async def read_all(self, limit: int) -> bytes:
        data = b""
        while len(data) < limit and (chunk := await self.read()):
            data += chunk
        if len(data) > limit:
            self._items.appendleft(data[limit:])
            data = data[:limit]
        return data

    def close(self) -> None:
        self.closed = True


class FakeTransport:
    """A scripted ``corral.upstream.Transport`` (the idea of httpx's ``MockTransport``).

    Steps are scripted per URL (``http://a.test:11434/api/chat``) or per backend base URL
    (``http://a.test:11434``, for any path under it); each :meth:`script` step answers one
    request, in order; an :meth:`always` step answers whenever the queue is empty. An exact URL
    is looked up before its base URL, a queue before an ``always``. A request nothing is
    scripted for fails the test (AssertionError). Every request is kept in :attr:`requests`,
    every answer in :attr:`responses`; :meth:`pool_stats` counts those not closed."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Step]] = {}
        self.standing: dict[str, Step] = {}
        self.requests: list[SentRequest] = []
        self.responses: list[FakeResponse] = []
        self.closed = False

    def script(self, url: str, *steps: Step) -> FakeTransport:
        self.queues.setdefault(url.rstrip("/"), deque()).extend(steps)
        return self

    def always(self, url: str, step: Step) -> FakeTransport:
        self.standing[url.rstrip("/")] = step
        return self

    def ollama(
        self,
        base: str,
        *models: str,
        resident: Iterable[str] = (),
        size: int = 2_000_000_000,
    ) -> FakeTransport:
        """Answer the health probes (``/api/version``, ``/api/tags``, ``/api/ps``) of an Ollama
        at ``base`` that has ``models`` installed and ``resident`` loaded (all on GPU)."""
        tags = {"models": [{"name": m, "model": m, "size": size} for m in models]}
        ps = {
            "models": [{"name": m, "model": m, "size": size, "size_vram": size} for m in resident]
        }
        self.always(f"{base}/api/version", Answer.json({"version": "0.9.0"}))
        self.always(f"{base}/api/tags", Answer.json(tags))
        self.always(f"{base}/api/ps", Answer.json(ps))
        return self

    def _step(self, method: str, url: str) -> Step:
        exact = url.split("?", 1)[0].rstrip("/")
        bases = sorted(
            (k for k in {*self.queues, *self.standing} if exact.startswith(k + "/")),
            key=len,
            reverse=True,
        )
        for key in (exact, *bases):
            queue = self.queues.get(key)
            if queue:
                return queue.popleft()
            if key in self.standing:
                return self.standing[key]
        raise AssertionError(f"FakeTransport: nothing scripted for {method} {url}")

    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: Body,
        *,
        headers_timeout_s: float | None,
        idle_timeout_s: float | None,
    ) -> FakeResponse:
        assert not self.closed, "request on a closed transport"
        data: bytes | None
        if body is None or isinstance(body, bytes):
            data = body
        else:
            data = b"".join([chunk async for chunk in body])
        self.requests.append(
            SentRequest(method, url, list(headers), data, headers_timeout_s, idle_timeout_s)
        )
        step = self._step(method, url)
        if isinstance(step, BaseException | type):
            raise step
        if step.wait is not None:
            await step.wait.wait()
        resp = FakeResponse(step, url)
        self.responses.append(resp)
        return resp

    def pool_stats(self) -> tuple[int, int]:
        """(0 idle, answers not closed yet): (0, 0) when every response was released."""
        return 0, sum(not r.closed for r in self.responses)

    async def close(self) -> None:
        self.closed = True

    def sent(self, path: str | None = None, *, probes: bool = False) -> list[SentRequest]:
        """The requests sent so far, to ``path`` only when given; health probes left out
        unless ``probes``."""
        out = []
        for r in self.requests:
            p = r.path.split("?", 1)[0]
            if not probes and p in ("/api/version", "/api/tags", "/api/ps"):
                continue
            if path is None or p == path:
                out.append(r)
        return out


def base_url(bid: str) -> str:
    """The URL :func:`offline_settings` gives backend ``bid`` (never resolved)."""
    return f"http://{bid}.test:11434"


def offline_settings(*ids: str, **sections: dict[str, Any]) -> Settings:
    """Settings for backends ``ids`` at :func:`base_url` that bind no port and touch no GPU
    (placement and GPU features off); ``sections`` are merged over those defaults."""
    overrides: dict[str, Any] = {
        "server": {"port": 11434, "log_level": "warning"},
        "health": {"interval_s": 30, "timeout_s": 1, "fall": 2, "rise": 1},
        "gpu": {"enabled": False},
        "placement": {"enabled": False},
        "backends": [{"id": bid, "url": base_url(bid)} for bid in ids],
    }
    for key, value in sections.items():
        merged = dict(overrides.get(key) or {})
        merged.update(value)
        overrides[key] = merged
    return load_config(None, overrides=overrides, env={})


@dataclass
class RecordingSend:
    """An ASGI ``send`` that keeps every message: the status, headers and body as sent."""

    messages: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, message: Any) -> None:
        self.messages.append(dict(message))

    @property
    def start(self) -> dict[str, Any]:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return starts[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.start["headers"] if k == key), None)

    @property
    def chunks(self) -> list[bytes]:
        """The body as it went out, one entry per message."""
        return [m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def finished(self) -> bool:
        """The response was ended properly (a last body message without ``more_body``)."""
        bodies = [m for m in self.messages if m["type"] == "http.response.body"]
        return bool(bodies) and not bodies[-1].get("more_body", False)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@asynccontextmanager
async def asgi_client(app: CorralApp, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` in-process on this event loop: its lifespan started (health probes included)
    and an ``httpx.AsyncClient`` over ``ASGITransport``; shut down on exit. Bodies are buffered:
    for non-streaming routes."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    message = await outbox.get()
    assert message["type"] == "lifespan.startup.complete", message
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", **kw
        ) as client:
            yield client
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        message = await outbox.get()
        assert message["type"] == "lifespan.shutdown.complete", message
        await task


def forbid_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to resolve a name or connect a socket fail the test."""

    def refuse(*args: Any, **kw: Any) -> Any:
        raise AssertionError(f"a test that needs no sockets tried to use one: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


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
