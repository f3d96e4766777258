"""A minimal httpx-based forwarding proxy: the "what would httpx cost" column of the benchmark.

Pure ASGI under uvicorn (uvloop + httptools), one shared ``httpx.AsyncClient`` tuned the way
the reference notes advise (keep-alive pool as large as the connection limit, no pool timeout),
round robin over the backends, the response streamed with ``send(stream=True)`` and
``aiter_raw()``. It does no routing, admission, metrics or logging: it is the floor of what an
httpx forwarder costs, not a competitor.

    python bench/_httpx_proxy.py --port 8001 --backend http://127.0.0.1:9001 --backend ...
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade", b"host"}
)
_RESP_SKIP = frozenset({"connection", "keep-alive", "transfer-encoding", "date", "server"})


class HttpxForwarder:
    """Forwards every HTTP request to the next backend in turn."""

    def __init__(self, backends: list[str], max_connections: int) -> None:
        self.cycle = itertools.cycle(backends)
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            timeout=httpx.Timeout(30.0, pool=None),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        url = next(self.cycle) + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP]
        request = self.client.build_request(
            scope["method"], url, headers=headers, content=b"".join(chunks)
        )
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.TransportError:
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b"upstream unreachable"})
            return
        try:
            out = [
                (k.lower(), v)
                for k, v in resp.headers.raw
                if k.decode("latin-1").lower() not in _RESP_SKIP
            ]
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", action="append", required=True, help="base URL; repeat")
    parser.add_argument("--max-connections", type=int, default=256)
    args = parser.parse_args()
    app = HttpxForwarder([b.rstrip("/") for b in args.backend], args.max_connections)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
