"""A backend that dies in the middle of a plain JSON body: the client sees the cut, no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

_TAGS = json.dumps({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]})
_ROUTES = {
    "/api/version": json.dumps({"version": "0.33.0"}),
    "/api/tags": _TAGS,
    "/api/ps": json.dumps({"models": []}),
}


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer health probes properly; cut /api/generate after 10 of its 1000 bytes."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if path in _ROUTES:
                body = _ROUTES[path].encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                continue
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"model":"'
            )
            await writer.drain()
            break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


@pytest.fixture
def cutting_backend() -> Iterator[str]:
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", port)
        started.set()
        async with server:
            await server.serve_forever()

    task: list[asyncio.Task[None]] = []

    def run() -> None:
        task.append(loop.create_task(main()))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(5)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(task[0].cancel)
    thread.join(5)
    loop.close()


def test_cut_plain_body_aborts_quietly(
    cutting_backend: str, corral_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The client gets a truncated body (a protocol error), corral logs no traceback."""
    corral = corral_factory([{"id": "cut", "url": cutting_backend}])
    with caplog.at_level(logging.ERROR), corral.client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
        # corral itself is fine afterwards.
        assert client.get("/healthz").status_code == 200
    assert not [r for r in caplog.records if r.exc_info]
