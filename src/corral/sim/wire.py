"""HTTP plumbing of the simulator: one ``Exchange`` per request over raw ASGI, JSON the way Go's
encoder writes it, Go-style timestamps and durations, and Ollama-shaped request errors."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from datetime import datetime
from typing import Any

from corral.asgi import Receive, Scope, Send, disconnected
from corral.shapes import Shape, error_payload
from corral.sim.stats import RequestRecord

JSON_TYPE = b"application/json; charset=utf-8"
TEXT_TYPE = b"text/plain; charset=utf-8"
NDJSON_TYPE = b"application/x-ndjson"
SSE_TYPE = b"text/event-stream"

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_encode_sorted = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes, UTF-8 unescaped, as Go's encoder writes them (minus HTML escaping)."""
    return _encode(obj).encode()


def dumps_sorted(obj: Any) -> bytes:
    """:func:`dumps` with every object's keys sorted, as Go writes a ``map[string]any``."""
    return _encode_sorted(obj).encode()


def jstr(text: str) -> str:
    """``text`` as a JSON string literal, for hand-built hot-path lines."""
    return _encode(text)


def random_id(prefix: str) -> str:
    """``prefix`` and 24 random hex digits, as Ollama's Anthropic layer makes message and
    request ids."""
    return f"{prefix}_{random.getrandbits(96):024x}"


class HTTPError(Exception):
    """An early error: answered with ``status`` and ``{"error": message}`` (or OpenAI's shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client went away while the request body was still arriving."""


class ConnectionAborted(Exception):
    """Raised to make the server close the connection when it cannot be aborted directly."""


# --- time -----------------------------------------------------------------------------------

# (second, "YYYY-mm-ddTHH:MM:SS"): replaced whole, so simulators on other threads never see a
# second paired with another second's text.
_utc_prefix: tuple[int, str] = (-1, "")

FOREVER_S = 9223372036.854775807  # math.MaxInt64 nanoseconds, Ollama's "forever"


def utc_now() -> str:
    """``time.Now().UTC()`` in RFC 3339 with nanoseconds, trailing zeros dropped (Go style)."""
    global _utc_prefix
    sec, frac = divmod(time.time_ns(), 1_000_000_000)
    cached_sec, prefix = _utc_prefix
    if cached_sec != sec:
        # strftime is the slow part; tokens share a second, so cache the prefix.
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _utc_prefix = (sec, prefix)
    if frac:
        return f"{prefix}.{frac:09d}".rstrip("0") + "Z"
    return f"{prefix}Z"


def local_time(ts: float) -> str:
    """A unix time in the server's local zone, RFC 3339 with fraction and offset (Go style)."""
    dt = datetime.fromtimestamp(ts).astimezone()
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        text += f".{dt.microsecond:06d}".rstrip("0")
    offset = dt.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset else 0
    if minutes == 0:
        return text + "Z"
    sign = "+" if minutes > 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{text}{sign}{hours:02d}:{mins:02d}"


_DUR_PART = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)?")
_UNIT_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` in seconds; ValueError with Go's message when invalid."""
    orig = text
    sign = 1.0
    if text[:1] in "+-" and text:
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{orig}"')
    total, pos = 0.0, 0
    while pos < len(text):
        m = _DUR_PART.match(text, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f'time: invalid duration "{orig}"')
        if m.group(2) is None:
            rest = text[m.end() :]
            if rest and not rest[0].isdigit():
                unit = re.match(r"[^0-9.]+", rest)
                raise ValueError(
                    f'time: unknown unit "{unit.group(0) if unit else rest}" in duration "{orig}"'
                )
            raise ValueError(f'time: missing unit in duration "{orig}"')
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    return sign * total


def parse_keep_alive(value: Any) -> float | None:
    """An Ollama ``keep_alive`` in seconds: None when absent, ``math.inf`` when negative
    (forever). Raises HTTPError 400 with Ollama's message when invalid."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        go = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}
        raise HTTPError(400, f"Unsupported type: '{go.get(type(value), type(value).__name__)}'")
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
    else:
        seconds = float(value)
    return math.inf if seconds < 0 else seconds


# --- request bodies -------------------------------------------------------------------------

_GO_KIND = {
    str: "string",
    bool: "bool",
    int: "number",
    float: "number",
    list: "array",
    dict: "object",
}
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "bool": (bool,),
    "int": (int,),
    "float64": (int, float),
    "array": (list,),
    "object": (dict,),
}
_GO_TYPE = {"array": "[]interface {}", "object": "map[string]interface {}"}


def decode_body(body: bytes, struct: str, package: str = "api") -> dict[str, Any]:
    """Decode a JSON request body whatever its Content-Type, failing the way Gin does.
    ``package`` is the Go package of ``struct``: the native handlers (``api``) name an empty
    body, the OpenAI and Anthropic middlewares pass on the decoder's ``EOF``."""
    if not body.strip():
        raise HTTPError(400, "missing request body" if package == "api" else "EOF")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid character looking for beginning of value") from None
    except RecursionError:
        # Go's decoder stops nesting at 10,000 levels; Python's recursion limit comes first.
        raise HTTPError(400, "exceeded max depth") from None
    except json.JSONDecodeError as exc:
        if exc.pos >= len(exc.doc.rstrip()):
            raise HTTPError(400, "unexpected EOF") from None
        char = exc.doc[exc.pos]
        where = "looking for beginning of value" if exc.pos == 0 else "after top-level value"
        if exc.pos and "Expecting" in exc.msg:
            where = (
                "looking for beginning of object key string"
                if "property" in exc.msg
                else "after object key:value pair"
            )
        raise HTTPError(400, f"invalid character {char!r} {where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = _GO_KIND.get(type(data), "value")
        raise HTTPError(
            400, f"json: cannot unmarshal {kind} into Go value of type {package}.{struct}"
        )
    return data


def check_types(data: dict[str, Any], struct: str, spec: dict[str, str]) -> None:
    """Reject fields of the wrong JSON type with Go's unmarshal message (null is always fine)."""
    for key, want in spec.items():
        value = data.get(key)
        if value is None:
            continue
        ok = isinstance(value, _ACCEPTS[want]) and not (
            isinstance(value, bool) and want in ("int", "float64")
        )
        if not ok:
            kind = _GO_KIND.get(type(value), "value")
            raise HTTPError(
                400,
                f"json: cannot unmarshal {kind} into Go struct field {struct}.{key} "
                f"of type {_GO_TYPE.get(want, want)}",
            )


# --- the exchange ---------------------------------------------------------------------------


class Exchange:
    """One HTTP request/response over raw ASGI, with disconnect detection.

    Responses start lazily: a stream commits its 200 only with its first line, so an error found
    before that still gets a real status code, as in Ollama's ``streamResponse``.
    """

    __slots__ = (
        "_watcher",
        "disconnected",
        "finished",
        "param",
        "raw",
        "receive",
        "record",
        "scope",
        "send",
        "shape",
        "started",
        "t0",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord,
        shape: Shape = "ollama",
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.record = record
        self.shape: Shape = shape
        self.started = False
        self.finished = False
        self.disconnected = False
        self.raw = b""
        self.param = ""
        self.t0 = time.perf_counter_ns()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def method(self) -> str:
        """The request method."""
        return str(self.scope["method"])

    async def body(self) -> bytes:
        """The whole request body."""
        chunks = []
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                self.disconnected = True
                raise ClientGone
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                return b"".join(chunks)

    def watch_disconnect(self) -> None:
        """Cancel the current task as soon as the client goes away (until ``finished``)."""
        task = asyncio.current_task()
        assert task is not None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(task))

    async def _watch(self, task: asyncio.Task[Any]) -> None:
        await disconnected(self.receive)
        if not self.finished:
            self.disconnected = True
            task.cancel()

    def stop_watching(self) -> None:
        """Stop the disconnect watcher (the response is complete or abandoned)."""
        self.finished = True
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def start(self, status: int, content_type: bytes, length: int | None = None) -> None:
        """Send the status line and headers (chunked when ``length`` is None)."""
        headers = [(b"content-type", content_type)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        self.started = True
        self.record.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def chunk(self, data: bytes) -> None:
        """Send one body part right away (each NDJSON line or SSE event is one part)."""
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def emit(self, data: bytes, content_type: bytes) -> None:
        """Send one stream part, committing a 200 with ``content_type`` before the first."""
        if not self.started:
            await self.start(200, content_type)
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"", content_type: bytes = NDJSON_TYPE) -> None:
        """Send the last body part (committing a 200 first if needed); the exchange is done."""
        self.finished = True
        if not self.started:
            await self.start(200, content_type)
        await self.send({"type": "http.response.body", "body": data, "more_body": False})

    async def respond(self, status: int, body: bytes, content_type: bytes = JSON_TYPE) -> None:
        """A complete response with Content-Length (HEAD gets the headers only)."""
        self.finished = True
        await self.start(status, content_type, len(body))
        if self.scope["method"] == "HEAD":
            body = b""
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def json(self, obj: Any, status: int = 200) -> None:
        """A complete JSON response."""
        await self.respond(status, dumps(obj))

    async def empty(self, status: int = 200) -> None:
        """A response with no body and no Content-Type (Gin's ``c.Status``)."""
        self.finished = True
        self.started = True
        self.record.status = status
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", b"0")],
            }
        )
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def error(self, status: int, message: str) -> None:
        """An early error in the route's shape: Ollama's, OpenAI's on /v1, Anthropic's on
        /v1/messages (with a ``request_id``, as Ollama's Anthropic errors carry one)."""
        self.record.error = message
        payload = error_payload(message, shape=self.shape, status=status)
        if self.shape == "anthropic":
            payload["request_id"] = random_id("req")
        await self.json(payload, status)

    async def abort(self) -> None:
        """Drop the TCP connection mid-response, with no final chunk (a crashed server)."""
        self.finished = True
        # uvicorn's send is a bound method of the request cycle, which holds the transport;
        # aborting it is the most faithful "connection reset" ASGI allows.
        cycle = getattr(self.send, "__self__", None)
        transport = getattr(cycle, "transport", None)
        if transport is None or not hasattr(transport, "abort"):
            raise ConnectionAborted("simulated connection drop")
        transport.abort()
        self.disconnected = True
        # Let connection_lost run, so uvicorn sees a disconnect rather than an unfinished reply.
        for _ in range(20):
            if getattr(cycle, "disconnected", True):
                break
            await asyncio.sleep(0)
