"""Hostile or broken backends against a real corral: raw-byte servers on loopback that answer
the health probes like an Ollama and everything else with what no Ollama sends (a bad status
line, a 9 KB header line, garbage, a redirect, an endless body, absurd listings). corral
retries elsewhere, counts, keeps its memory, and tells clients no addresses."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import httpx
import pytest

from corral.config import TimeoutSettings
from corral.errors import UpstreamTooLargeError
from corral.upstream import MAX_BODY_BYTES, Upstream
from tests.helpers import metric, poll

pytestmark = pytest.mark.integration

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]
Route = bytes | Writer

OK_TAGS = {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 100}]}


def ok(obj: Any, status: str = "200 OK") -> bytes:
    body = json.dumps(obj).encode()
    return (
        b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status.encode(), len(body), body)
    )


class Hostile:
    """A loopback server speaking raw bytes: probes answered as an Ollama with llama3.2,
    anything in ``routes`` (by path) as scripted, everything else with ``default``. One
    request per connection; ``sent`` keeps the bytes written on each connection."""

    def __init__(self, default: Route, **routes: Route) -> None:
        self.routes: dict[str, Route] = {
            "/api/version": ok({"version": "0.9.0"}),
            "/api/tags": ok(OK_TAGS),
            "/api/ps": ok({"models": []}),
        }
        # api_tags="..." scripts /api/tags
        self.routes.update({"/" + k.replace("_", "/"): v for k, v in routes.items()})
        self.default = default
        self.sent: list[int] = []
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._stopped = False
        # Every connection's transport, from the moment it is made (so none outlives stop()).
        self._transports: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            path = head.split(b" ", 2)[1].decode().split("?")[0]
            route = self.routes.get(path, self.default)
            if isinstance(route, bytes):
                writer.write(route)
                await writer.drain()
            else:
                await route(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        transports = self._transports

        class Protocol(asyncio.StreamReaderProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transports.add(cast(asyncio.Transport, transport))
                super().connection_made(transport)

        def protocol() -> Protocol:
            return Protocol(asyncio.StreamReader(), self._handle)

        self._server = await loop.create_server(protocol, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> Hostile:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stopped:
            return
        self._stopped = True

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in self._tasks:  # only ours: cancelling asyncio's accept task leaks
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for transport in self._transports:
                transport.abort()  # even one whose handler never ran, or with bytes unsent

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        # Run what the stop left scheduled (transports closing their sockets), then close.
        self.loop.run_until_complete(_flush())
        self.loop.close()

    def endless(self, head: bytes) -> Writer:
        """Write ``head`` then body bytes until the reader goes away; count them."""

        async def write(writer: asyncio.StreamWriter) -> None:
            index = len(self.sent)
            self.sent.append(0)
            writer.write(head)
            chunk = b"x" * 65536
            while True:
                writer.write(chunk)
                await writer.drain()
                self.sent[index] += len(chunk)

        return write


async def _flush() -> None:
    await asyncio.sleep(0.01)


@pytest.fixture
def hostile() -> Iterator[Callable[..., Hostile]]:
    started: list[Hostile] = []

    def start(default: Route, **routes: Route) -> Hostile:
        server = Hostile(default, **routes).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__()
    started.clear()
    # Now and quietly: a connection a hostile server had accepted as it stopped is garbage
    # (the test double's, not corral's), collected here rather than in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def generate(client: httpx.Client) -> httpx.Response:
    body = {"model": "llama3.2", "prompt": "x", "stream": False}
    return client.post("/api/generate", json=body)


def malformed(client: httpx.Client, backend_id: str, reason: str) -> float:
    labels = f'backend="{backend_id}",reason="{reason}"'
    return metric(client, "corral_backend_malformed_total{" + labels + "}")


REDIRECT = b"HTTP/1.1 %s\r\nLocation: http://evil.example/\r\nContent-Length: 0\r\n\r\n"
ROUND_ROBIN = {"strategy": "round_robin", "model_affinity": False, "session_affinity": False}
# Keep a failing backend in rotation: these tests are about retries, not ejection.
KEEP_IN = {"consecutive_errors": 100, "error_min_requests": 1000}


def beside_good(bad: Hostile, sim_factory: Any, corral_factory: Any, **sections: Any) -> Any:
    """corral over the hostile backend ``bad`` and a good simulator, ids "bad" and "good"."""
    good = sim_factory(name="good")
    return corral_factory(
        [{"id": "bad", "url": bad.url}, {"id": "good", "url": good.url}], **sections
    )


BAD_HTTP = {
    "bad-status-line": b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nhi",
    "status-999": b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nhi",
    "9k-header-line": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Big: "
        + b"a" * 9000
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    ),
    "garbage": b"\x00\x01\x02 this is no HTTP at all\r\n\r\n",
}


@pytest.mark.parametrize("raw", BAD_HTTP.values(), ids=BAD_HTTP.keys())
def test_malformed_http_is_retried_elsewhere_and_counted(
    raw: bytes,
    hostile: Any,
    sim_factory: Any,
    corral_factory: Any,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Malformed HTTP on routed requests (its probes are fine): every request is answered 200
    by the healthy backend, the bad one is counted as malformed_http, no traceback is logged."""
    bad = hostile(raw)
    corral = beside_good(bad, sim_factory, corral_factory, balancer=ROUND_ROBIN, health=KEEP_IN)
    with corral.client() as client:
        for _ in range(6):
            r = generate(client)
            assert r.status_code == 200, r.text
            assert r.headers["x-corral-backend"] == "good"
        assert malformed(client, "bad", "malformed_http") >= 3
        assert metric(client, 'corral_retries_total{reason="malformed"}') >= 3
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_malformed_answers_eject_and_probes_do_not_lift_it(
    hostile: Any, sim_factory: Any, corral_factory: Any
) -> None:
    """A backend that keeps answering garbage is ejected, and stays out although its health
    probes pass (a reachable backend that answers badly is not cured by a good probe)."""
    bad = hostile(BAD_HTTP["garbage"])
    health = {"consecutive_errors": 2, "ejection_s": 30}
    corral = beside_good(bad, sim_factory, corral_factory, balancer=ROUND_ROBIN, health=health)
    with corral.client() as client:
        for _ in range(8):
            assert generate(client).status_code == 200

    def ejected() -> bool:
        return bool(corral.call(lambda: corral.runtime.registry.get("bad").ejected_until > 0))

    assert poll(ejected, 5)
    # Five probe intervals (0.2 s) later, all of them passing: still out.
    assert not poll(lambda: not ejected(), 1.0)


def test_redirect_is_retried_elsewhere_without_location(
    hostile: Any, sim_factory: Any, corral_factory: Any
) -> None:
    """A backend's 302 is never relayed: the request is answered by another backend, no
    Location reaches the client, the redirect is counted."""
    bad = hostile(REDIRECT % b"302 Found")
    corral = beside_good(bad, sim_factory, corral_factory, balancer=ROUND_ROBIN, health=KEEP_IN)
    with corral.client() as client:
        for _ in range(4):
            r = generate(client)
            assert (r.status_code, r.headers["x-corral-backend"]) == (200, "good")
            assert "location" not in r.headers
        assert malformed(client, "bad", "redirect") >= 2


def test_redirect_from_the_only_backend_is_a_502_without_location(
    hostile: Any, corral_factory: Any
) -> None:
    """With nowhere else to go, a redirect is a clean 502 in Ollama's shape."""
    bad = hostile(REDIRECT % b"307 Temporary Redirect")
    corral = corral_factory([{"id": "bad", "url": bad.url}])
    with corral.client() as client:
        r = generate(client)
    assert r.status_code == 502
    assert "location" not in r.headers
    assert "redirect" in r.json()["error"]
    assert "evil.example" not in r.text


def test_connect_error_502_names_no_address(hostile: Any, corral_factory: Any) -> None:
    """A backend that stops listening: the 502 says which backend and why, never its host or
    port."""
    bad = hostile(b"")
    corral = corral_factory([{"id": "gpu0", "url": bad.url}], health={"interval_s": 30})
    bad.__exit__()  # nothing listens on its port any more; corral still thinks it is up
    with corral.client() as client:
        r = generate(client)
    assert r.status_code == 502
    assert r.json() == {"error": "backend gpu0 unreachable: connection refused"}
    assert "127.0.0.1" not in r.text
    assert str(bad.port) not in r.text


def test_endless_tags_fails_the_probe_and_memory_stays_bounded(
    hostile: Any, corral_factory: Any
) -> None:
    """An /api/tags that never ends: each probe stops reading at corral's cap and fails; the
    backend never comes up; the read stopped near the cap on every connection."""
    bad = hostile(b"")
    bad.routes["/api/tags"] = bad.endless(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
    )
    corral = corral_factory([{"id": "bad", "url": bad.url}])
    assert poll(lambda: len(bad.sent) >= 3, 10)
    with corral.client() as client:
        assert malformed(client, "bad", "too_large") >= 1
        assert client.get("/api/tags").status_code == 503  # the only backend never came up
    assert corral.call(lambda: not corral.runtime.registry.get("bad").healthy)
    # Each connection got at most the cap plus what loopback socket buffers hold.
    assert max(bad.sent[:3]) < MAX_BODY_BYTES + 24 * 1024 * 1024


async def test_upstream_stops_reading_at_the_cap(hostile: Any) -> None:
    """The seam itself: a whole-body read of an endless answer fails as too large once the cap
    is passed, having read not much more than the cap."""
    bad = hostile(b"")
    bad.default = bad.endless(b"HTTP/1.1 200 OK\r\n\r\n")
    upstream = Upstream(TimeoutSettings())
    try:
        with pytest.raises(UpstreamTooLargeError) as caught:
            await upstream.get_bytes(bad.url + "/metrics", 10, limit=1 << 20)
    finally:
        await upstream.close()
    assert caught.value.reason == "too_large"
    assert str(bad.port) not in str(caught.value)
    assert poll(lambda: bool(bad.sent), 2)
    assert bad.sent[0] < (1 << 20) + 24 * 1024 * 1024


def test_huge_error_body_on_a_routed_request_is_bounded(
    hostile: Any, sim_factory: Any, corral_factory: Any
) -> None:
    """A 500 with an endless body: corral reads a little of it, answers from another backend,
    and stops reading the bad one."""
    bad = hostile(b"")
    bad.default = bad.endless(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    corral = beside_good(bad, sim_factory, corral_factory, balancer=ROUND_ROBIN)
    with corral.client() as client:
        for _ in range(2):
            r = generate(client)
            assert (r.status_code, r.headers["x-corral-backend"]) == (200, "good")
    assert bad.sent
    assert max(bad.sent) < 24 * 1024 * 1024


def test_absurd_listings_do_not_break_the_aggregates(
    hostile: Any, sim_factory: Any, corral_factory: Any
) -> None:
    """A backend with a 5,000-digit version and odd /api/ps and /api/tags entries: /api/version,
    /api/ps, /api/tags and /v1/models still answer 200 from the rest."""
    odd = [["a", "list"], {"name": 7}, {"name": "s:latest", "size": "4GB"}]
    bad = hostile(
        b"",
        api_version=ok({"version": "9" * 5000}),
        api_ps=ok({"models": odd}),
        api_tags=ok({"models": [*odd, OK_TAGS["models"][0]]}),
    )
    corral = beside_good(bad, sim_factory, corral_factory)
    assert poll(lambda: corral.call(lambda: corral.runtime.registry.get("bad").healthy), 5)
    with corral.client() as client:
        r = client.get("/api/version")
        assert r.status_code == 200
        assert r.json()["version"] != "9" * 5000
        r = client.get("/api/ps")
        assert r.status_code == 200
        assert all(isinstance(m["name"], str) for m in r.json()["models"])
        r = client.get("/api/tags")
        assert r.status_code == 200
        assert "llama3.2:latest" in [m["name"] for m in r.json()["models"]]
        assert client.get("/v1/models").status_code == 200


def test_version_answers_are_cached(hostile: Any, corral_factory: Any) -> None:
    """Many /api/version calls within a second cost the backend one request (plus probes)."""
    counted: list[int] = [0]
    version = ok({"version": "0.9.0"})

    async def answer(writer: asyncio.StreamWriter) -> None:
        counted[0] += 1
        writer.write(version)
        await writer.drain()

    bad = hostile(b"")
    corral = corral_factory([{"id": "a", "url": bad.url}], health={"interval_s": 30})
    bad.routes["/api/version"] = answer  # probes done: from here on only corral's listings ask
    with corral.client() as client:
        for _ in range(20):
            assert client.get("/api/version").json() == {"version": "0.9.0"}
    assert counted[0] <= 2  # one fetch, or two if the loop crossed a second
