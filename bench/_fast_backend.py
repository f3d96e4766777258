"""A minimal, fast Ollama-shaped HTTP/1.1 responder: the default backend of bench/overhead.py.

With the simulator (``python -m corral.sim``, a full ASGI app) as the backend, the backend is
the bottleneck: nginx is capped by it, and the benchmark measures the simulator, not the proxy.
This answers the few routes the benchmark and corral's health checks use, straight from an
``asyncio.Protocol`` (stdlib API; on uvloop when it is installed, ``--no-uvloop`` to refuse),
with keep-alive and pipelining, ``Content-Length`` (and chunked) request bodies, and canned
answers: no framework, no model, no timing but the streaming pace.

Routes:

- ``GET /api/version``, ``GET|HEAD /api/tags``, ``GET /api/ps``: one model, ``--model``
  (default ``llama3.2:latest``), installed and loaded, fully on the "GPU" (``size_vram ==
  size``): what corral's health probe and inventory need to consider the backend healthy and
  route the model to it. ``HEAD|GET /``: "Ollama is running".
- ``POST /api/generate`` and ``/api/chat``: non-streaming, one JSON answer with Ollama's final
  fields (``done_reason``, ``total_duration``, ``load_duration``, ``prompt_eval_count``,
  ``eval_count``, ...) at once; streaming (the default, as in Ollama, unless ``"stream":
  false``), ``--tokens`` NDJSON lines ``--token-interval-ms`` apart, then the ``"done":true``
  line.
- ``POST /v1/chat/completions``: non-streaming ``chat.completion`` with ``usage`` (the
  default), or with ``"stream": true`` server-sent events, ``--tokens`` chunks
  ``--token-interval-ms`` apart, a ``finish_reason`` chunk and ``data: [DONE]``.
- A request may override the stream's shape with the ``X-Fast-Tokens`` and
  ``X-Fast-Interval-Ms`` headers (the benchmark does not).

Anything else: 404 (unknown path) or 405 (wrong method), with Ollama's ``{"error": ...}``.

    python bench/_fast_backend.py --port 9001 [--tokens 32 --token-interval-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, cast

MODEL_SIZE = 2_019_393_189
DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "3.2B",
    "quantization_level": "Q4_K_M",
}
WORDS = ["The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering. "]
MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
REASONS |= {411: "Length Required", 413: "Payload Too Large", 431: "Header Too Large"}


class Clock:
    """The Date header and Ollama's ``created_at``, recomputed at most once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.date = b""
        self.created_at = ""

    def tick(self) -> None:
        now = time.time()
        if int(now) != self.second:
            self.second = int(now)
            self.date = formatdate(now, usegmt=True).encode()
            self.created_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".000000Z"


class Answers:
    """Every canned answer, built once per (route, model) and reused."""

    def __init__(self, args: argparse.Namespace, clock: Clock) -> None:
        self.model = args.model
        self.tokens = args.tokens
        self.interval_s = args.token_interval_ms / 1000
        self.clock = clock
        self._cache: dict[tuple[str, str], bytes] = {}
        self._streams: dict[tuple[str, str, int], list[bytes]] = {}

    # -- GET routes --

    def tags(self) -> dict[str, Any]:
        entry = {
            "name": self.model,
            "model": self.model,
            "modified_at": "2025-01-01T00:00:00.000000000Z",
            "size": MODEL_SIZE,
            "digest": DIGEST,
            "details": DETAILS,
        }
        return {"models": [entry]}

    def ps(self) -> dict[str, Any]:
        entry = {
            "name": self.model,
            "model": self.model,
            "size": MODEL_SIZE,
            "digest": DIGEST,
            "details": DETAILS,
            "expires_at": "2099-01-01T00:00:00.000000000Z",
            "size_vram": MODEL_SIZE,
            "context_length": 4096,
        }
        return {"models": [entry]}

    # -- non-streaming --

    def final_fields(self, tokens: int) -> dict[str, Any]:
        return {
            "done": True,
            "done_reason": "stop",
            "total_duration": 1_000_000,
            "load_duration": 100_000,
            "prompt_eval_count": 8,
            "prompt_eval_duration": 200_000,
            "eval_count": tokens,
            "eval_duration": 700_000,
        }

    def text(self, tokens: int) -> str:
        return "".join(WORDS[i % len(WORDS)] for i in range(tokens))

    def whole(self, route: str, model: str) -> bytes:
        """The non-streaming answer's body (``created_at`` fixed at first use: it is canned)."""
        key = (route, model)
        body = self._cache.get(key)
        if body is None:
            body = json.dumps(self._whole(route, model), separators=(",", ":")).encode()
            if len(self._cache) < 64:
                self._cache[key] = body
        return body

    def _whole(self, route: str, model: str) -> dict[str, Any]:
        n = self.tokens
        created = self.clock.created_at
        if route == "generate":
            return {
                "model": model,
                "created_at": created,
                "response": self.text(n),
                **self.final_fields(n),
            }
        if route == "chat":
            message = {"role": "assistant", "content": self.text(n)}
            return {
                "model": model,
                "created_at": created,
                "message": message,
                **self.final_fields(n),
            }
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text(n)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
        }

    # -- streaming --

    def chunks(self, route: str, model: str, tokens: int) -> list[bytes]:
        """Every event of one stream, each a complete NDJSON line or SSE event (canned too)."""
        key = (route, model, tokens)
        events = self._streams.get(key)
        if events is None:
            events = self._chunks(route, model, tokens)
            if len(self._streams) < 64:
                self._streams[key] = events
        return events

    def _chunks(self, route: str, model: str, tokens: int) -> list[bytes]:
        created = self.clock.created_at
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        out: list[bytes] = []
        if route in ("generate", "chat"):
            for i in range(tokens):
                word = WORDS[i % len(WORDS)]
                part: dict[str, Any] = {"model": model, "created_at": created}
                if route == "generate":
                    part |= {"response": word, "done": False}
                else:
                    part |= {"message": {"role": "assistant", "content": word}, "done": False}
                out.append(dumps(part).encode() + b"\n")
            last: dict[str, Any] = {"model": model, "created_at": created}
            if route == "generate":
                last["response"] = ""
            else:
                last["message"] = {"role": "assistant", "content": ""}
            out.append(dumps(last | self.final_fields(tokens)).encode() + b"\n")
            return out
        head = {
            "id": "chatcmpl-fast",
            "object": "chat.completion.chunk",
            "created": self.clock.second,
            "model": model,
            "system_fingerprint": "fp_ollama",
        }
        for i in range(tokens):
            delta = {"content": WORDS[i % len(WORDS)]}
            if i == 0:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            out.append(b"data: " + dumps(head | {"choices": [choice]}).encode() + b"\n\n")
        choice = {"index": 0, "delta": {}, "finish_reason": "stop"}
        out.append(b"data: " + dumps(head | {"choices": [choice]}).encode() + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out


ROUTES = {"/api/generate": "generate", "/api/chat": "chat", "/v1/chat/completions": "v1"}
GETS = ("/", "/api/version", "/api/tags", "/api/ps")


Head = tuple[str, str, int, bool, bool, dict[str, str]]
# Clients repeat the same request head and body over and over (every benchmark request is
# identical): parse each distinct one once. Bounded: cleared when full.
_heads: dict[bytes, Head | None] = {}
_bodies: dict[tuple[bytes, str], tuple[str, bool] | bytes] = {}
CACHE_MAX = 4096


def parse_head(raw: bytes) -> Head | None:
    """(method, path, content length, chunked, keep-alive, lower-cased headers); None: bad."""
    if raw in _heads:
        return _heads[raw]
    head = _parse_head(raw)
    if len(_heads) >= CACHE_MAX:
        _heads.clear()
    _heads[raw] = head
    return head


def _parse_head(raw: bytes) -> Head | None:
    lines = raw.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        return None
    length = 0
    chunked = False
    keep_alive = version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = value
        if name == "content-length":
            if not value.isdigit():
                return None
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            v = value.lower()
            keep_alive = "close" not in v and (keep_alive or "keep-alive" in v)
    return method, target.partition("?")[0], length, chunked, keep_alive, headers


def parse_body(body: bytes, route: str) -> tuple[str, bool] | bytes:
    """(model, stream) of a POST body, or the 400 answer's body."""
    key = (body, route)
    parsed = _bodies.get(key)
    if parsed is None:
        parsed = _parse_body(body, route)
        if len(body) <= 4096:  # do not keep big prompts
            if len(_bodies) >= CACHE_MAX:
                _bodies.clear()
            _bodies[key] = parsed
    return parsed


def _parse_body(body: bytes, route: str) -> tuple[str, bool] | bytes:
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return _error("invalid JSON body")
    if not isinstance(data, dict):
        return _error("the body is not a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        return _error("model is required")
    # Ollama streams unless told not to; the OpenAI API does not unless told to.
    return model, bool(data.get("stream", route != "v1"))


class HTTP(asyncio.Protocol):
    """One client connection: parse requests off the buffer, answer them in order."""

    def __init__(self, answers: Answers, clock: Clock) -> None:
        self.answers = answers
        self.clock = clock
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.streaming = False  # a streamed answer is being written: later requests wait
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.streaming:
            self.process()

    def process(self) -> None:
        while self.buf and not self.streaming and not self.closing and self.transport:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.fail(431)
                return
            head = parse_head(self.buf[:end])
            if head is None:
                self.fail(400)
                return
            method, path, length, chunked, keep_alive, headers = head
            start = end + 4
            if chunked:
                decoded = _dechunk(self.buf, start)
                if decoded is None:
                    if len(self.buf) > MAX_BODY:
                        self.fail(413)
                    return
                body, stop = decoded
            else:
                if length > MAX_BODY:
                    self.fail(413)
                    return
                stop = start + length
                if len(self.buf) < stop:
                    return
                body = self.buf[start:stop]
            self.buf = self.buf[stop:]
            if not keep_alive:
                self.closing = True
            self.handle(method, path, headers, body)
            if self.closing and not self.streaming and self.transport:
                self.transport.close()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        a = self.answers
        route = ROUTES.get(path)
        if route is not None:
            if method != "POST":
                self.send(405, _error("method not allowed"))
                return
            parsed = parse_body(body, route)
            if isinstance(parsed, bytes):
                self.send(400, parsed)
                return
            model, stream = parsed
            if stream:
                try:
                    tokens = int(headers.get("x-fast-tokens", a.tokens))
                    interval_ms = float(headers.get("x-fast-interval-ms", a.interval_s * 1000))
                except ValueError:
                    self.send(400, _error("bad X-Fast-Tokens or X-Fast-Interval-Ms"))
                    return
                tokens = max(0, min(tokens, 100_000))
                self.stream(route, a.chunks(route, model, tokens), max(0.0, interval_ms) / 1000)
            else:
                self.send(200, a.whole(route, model))
            return
        if path not in GETS:
            self.send(404, _error(f"{path} not found"))
            return
        if method not in ("GET", "HEAD"):
            self.send(405, _error("method not allowed"))
            return
        if path == "/":
            self.send(
                200, b"Ollama is running", b"text/plain; charset=utf-8", head=method == "HEAD"
            )
            return
        if path == "/api/version":
            payload: dict[str, Any] = {"version": "0.6.0"}
        elif path == "/api/tags":
            payload = a.tags()
        else:
            payload = a.ps()
        self.send(200, json.dumps(payload).encode(), head=method == "HEAD")

    def send(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json; charset=utf-8",
        *,
        head: bool = False,
    ) -> None:
        if self.transport is None:
            return
        self.clock.tick()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nDate: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (
                status,
                REASONS.get(status, "Error").encode(),
                content_type,
                self.clock.date,
                len(body),
                b"Connection: close\r\n" if self.closing else b"",
                b"" if head else body,
            )
        )

    def fail(self, status: int) -> None:
        self.closing = True
        self.send(status, _error(REASONS.get(status, "error").lower()))
        if self.transport:
            self.transport.close()

    def stream(self, route: str, chunks: list[bytes], interval_s: float) -> None:
        """Chunked transfer: the first event at once, then one every ``interval_s``."""
        if self.transport is None:
            return
        self.clock.tick()
        ctype = b"text/event-stream" if route == "v1" else b"application/x-ndjson"
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nDate: %s\r\nTransfer-Encoding: chunked\r\n"
            b"%s\r\n" % (ctype, self.clock.date, b"Connection: close\r\n" if self.closing else b"")
        )
        if interval_s <= 0:
            self.transport.write(b"".join(_chunk(c) for c in chunks) + b"0\r\n\r\n")
            return
        self.streaming = True
        loop = asyncio.get_running_loop()
        it = iter(chunks)

        def step() -> None:
            if self.transport is None:
                return
            part = next(it, None)
            if part is None:
                self.transport.write(b"0\r\n\r\n")
                self.streaming = False
                if self.closing:
                    self.transport.close()
                elif self.buf:
                    self.process()
                return
            self.transport.write(_chunk(part))
            loop.call_later(interval_s, step)

        step()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _dechunk(buf: bytes, start: int) -> tuple[bytes, int] | None:
    """A chunked body from ``buf[start:]``: (body, end offset), or None while incomplete."""
    parts: list[bytes] = []
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)
            return (b"".join(parts), end + 4) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        parts.append(buf[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def serve(args: argparse.Namespace) -> None:
    clock = Clock()
    clock.tick()
    answers = Answers(args, clock)
    loop = asyncio.get_running_loop()
    factory: Callable[[], HTTP] = lambda: HTTP(answers, clock)  # noqa: E731
    server = await loop.create_server(factory, args.host, args.port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fast backend on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="llama3.2:latest", help="the one model it holds")
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer (streamed ones)")
    p.add_argument("--token-interval-ms", type=float, default=5.0, help="gap between tokens")
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="stdlib event loop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve(args))
            return
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
