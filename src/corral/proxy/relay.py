"""The one writer of what a client receives: relayed bytes, errors before the first byte, the
error line after it, and corral's own small answers (404, 405, listings).

A backend's answer is held back until its first body byte: a backend that dies before it can
still be retried elsewhere, since the client has seen nothing yet. After that, each chunk goes
out as it arrives (whole lines for NDJSON and SSE, so that an error line sent when the backend
dies is not glued to half a line); a plain body cut short can carry no error, so the
connection is aborted, as nginx does.
"""

from __future__ import annotations

import json
import re
import time

from corral.asgi import Headers, Send
from corral.errors import (
    NoBackendError,
    RoutingError,
    UpstreamBrokenError,
    UpstreamError,
    UpstreamMalformedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from corral.proxy.request import Result
from corral.shapes import Shape, error_body, error_payload
from corral.upstream import Response

JSON = (b"content-type", b"application/json; charset=utf-8")
TEXT = (b"content-type", b"text/plain; charset=utf-8")
_RESPONSE_SKIP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"date",
        b"server",
    }
)
_LINES_SKIP = _RESPONSE_SKIP | {b"content-length"}
# Ollama's final-chunk counters (OpenAI's usage): the tokens generated, and how the backend
# served (prompt tokens, cache hits, load and prefill times). One pass over the tail.
# Anthropic's and the Responses API's usage say input_tokens / output_tokens.
_FINAL_STATS = re.compile(
    rb'"(eval_count|completion_tokens|output_tokens|load_duration|prompt_eval_count'
    rb'|prompt_eval_cached_count|prompt_eval_duration|prompt_tokens|input_tokens|cached_tokens)"'
    rb":\s*(\d+)"
)
_GENERATED = frozenset({"eval_count", "completion_tokens", "output_tokens"})
_SAME = {"input_tokens": "prompt_tokens"}
BUSY = b"server busy"  # Ollama's 503 body when its own queue is full
# Longer than any line Ollama streams: relayed as it comes rather than held in memory.
_MAX_HELD = 65536


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Headers, *, head: bool = False
) -> None:
    """A whole small response in two messages."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def ndjson_error(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode() + b"\n"


def sse_error(message: str, shape: Shape = "openai", events: bool = False) -> bytes:
    """The event that ends a broken stream: OpenAI chat's error chunk, or an ``error`` event
    where the stream names its events (Anthropic's error object; the Responses API's)."""
    if not events:
        payload = error_payload(message, shape="openai", status=500)
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    if shape == "anthropic":
        payload = error_payload(message, shape="anthropic", status=500)
    else:
        payload = {"type": "error", "code": "server_error", "message": message, "param": None}
    data = json.dumps(payload, separators=(",", ":")).encode()
    return b"event: error\ndata: " + data + b"\n\n"


# Ollama's own words for an unknown path or a wrong method (Go's net/http mux), also used by
# the FastAPI fallback for paths outside the admin API.
NOT_FOUND = "404 page not found"
METHOD_NOT_ALLOWED = "405 method not allowed"


async def not_found(send: Send) -> None:
    await send_bytes(send, 404, NOT_FOUND.encode(), [TEXT])


async def method_not_allowed(send: Send) -> None:
    await send_bytes(send, 405, METHOD_NOT_ALLOWED.encode(), [TEXT])


class Reply:
    """Writes one routed request's response; :attr:`started` says whether the client has
    seen the status line (after that, errors can only be told in-stream)."""

    __slots__ = ("events", "request_id", "send", "shape", "started")

    def __init__(
        self, send: Send, request_id: str, shape: Shape = "ollama", *, events: bool = False
    ) -> None:
        self.send = send
        self.request_id = request_id
        self.shape: Shape = shape
        self.events = events
        self.started = False

    async def error(self, status: int, message: str, extra: Headers | None = None) -> None:
        """corral's own error, before any byte was sent."""
        headers = [JSON, (b"x-request-id", self.request_id.encode()), *(extra or ())]
        body = error_body(message, shape=self.shape, status=status)
        await send_bytes(self.send, status, body, headers)

    async def fail(self, exc: RoutingError) -> None:
        """Answer a request that could not be served (nothing was sent yet)."""
        if isinstance(exc, UpstreamStatusError):
            # The backend's own answer, as it gave it.
            ctype = exc.content_type or "application/json; charset=utf-8"
            payload = exc.payload or error_body(str(exc), shape=self.shape, status=exc.status)
            headers = [(b"content-type", ctype.encode())]
            if exc.backend_id:
                headers.append((b"x-corral-backend", exc.backend_id.encode()))
            if exc.busy:
                headers.append((b"retry-after", b"1"))
            headers.append((b"x-request-id", self.request_id.encode()))
            await send_bytes(self.send, exc.status, payload, headers)
            return
        extra: Headers = []
        if isinstance(exc, NoBackendError):
            extra.append((b"retry-after", str(exc.retry_after_s).encode()))
        await self.error(exc.status, str(exc), extra)

    async def relay(
        self, resp: Response, backend_id: str, result: Result, started: float, idle_s: float
    ) -> float:
        """Stream ``resp`` to the client; fills ``result`` (status, ttft, tokens, stats,
        error) and returns when the first body byte arrived (perf_counter).

        Raises UpstreamError only before the status line went out (safe to retry)."""
        try:
            first = await resp.read()
        except UpstreamTimeoutError:
            raise UpstreamTimeoutError(
                f"backend {backend_id} sent headers but no body in time"
            ) from None
        except UpstreamError as exc:
            # A malformed answer stays one (it is counted as such, and ejects).
            kind = type(exc) if isinstance(exc, UpstreamMalformedError) else UpstreamBrokenError
            raise kind(
                f"backend {backend_id} failed before its body: {exc}", address=exc.address
            ) from None
        status = resp.status
        content_type = resp.header(b"content-type") or b""
        ndjson, sse = b"ndjson" in content_type, b"event-stream" in content_type
        lines = ndjson or sse
        # A line stream may end with corral's error line: never bound it by the backend's
        # Content-Length.
        skip = _LINES_SKIP if lines else _RESPONSE_SKIP
        headers = [(k, v) for k, v in resp.headers if k not in skip]
        headers.append((b"x-corral-backend", backend_id.encode()))
        headers.append((b"x-request-id", self.request_id.encode()))
        first_at = time.perf_counter()
        result.ttft_s = round(first_at - started, 6)  # as the client saw it, queueing included
        send = self.send
        self.started = True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        # The last chunk closes the response in the same write (one syscall fewer).
        ended = not first or resp.at_eof()
        tail = first[-768:]
        held = b""
        if lines:
            first, held = _whole_lines(first, ended)
        await send({"type": "http.response.body", "body": first, "more_body": not ended})
        last = first  # the last bytes sent: does a line stand open?
        error: str | None = None
        try:
            while not ended:
                chunk = await resp.read()
                ended = not chunk or resp.at_eof()
                tail = tail[-256:] + chunk if len(chunk) < 512 else chunk
                if lines:
                    chunk, held = _whole_lines(held + chunk if held else chunk, ended)
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                if chunk:
                    last = chunk
        except UpstreamTimeoutError:
            error = f"backend {backend_id} stalled: no data for {idle_s:g}s"
        except UpstreamError as exc:
            error = f"backend {backend_id} failed mid-stream: {exc}"
        if error is not None:
            result.status, result.error = 502, error
            # A line longer than corral holds went out unfinished: end it first, so that the
            # error line is a line of its own.
            open_line = bool(last) and not last.endswith(b"\n")
            if ndjson:
                body = (b"\n" if open_line else b"") + ndjson_error(error)
                await send({"type": "http.response.body", "body": body})
            elif sse:
                # A blank line first ends an event whose data line went out without its own.
                end = b"\n\n" if open_line else b"\n"
                body = end + sse_error(error, self.shape, self.events)
                await send({"type": "http.response.body", "body": body})
            # A plain body cut short cannot carry an error: returning without finishing the
            # response makes the server close the connection (a truncated body, no traceback).
            return first_at
        result.status = status
        if status == 200:
            stats = result.stats
            for key, value in _FINAL_STATS.findall(tail):
                name = key.decode()
                if name in _GENERATED:
                    result.tokens = int(value)  # the last one counts
                else:
                    stats[_SAME.get(name, name)] = int(value)
        elif status == 503 and BUSY in tail:
            result.busy = True
        return first_at


def _whole_lines(data: bytes, ended: bool) -> tuple[bytes, bytes]:
    """What of a stream to relay now: ``data`` up to its last newline, and the unfinished line
    held back for the next chunk (none once the stream ended, or when absurdly long)."""
    if ended or data.endswith(b"\n"):
        return data, b""
    cut = data.rfind(b"\n") + 1
    if len(data) - cut > _MAX_HELD:
        return data, b""
    return data[:cut], data[cut:]
