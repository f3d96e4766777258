"""A load driver for the chaos suite: client threads sending a mix of native and OpenAI
requests, streamed or not, through corral, and a judge of how each one ended."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.chaos.support import poll

MODEL = "llama3.2"


@dataclass(frozen=True)
class Kind:
    """One kind of client request."""

    name: str
    path: str
    body: dict[str, Any]
    stream: bool
    openai: bool


_MESSAGES = [{"role": "user", "content": "hi"}]
KINDS: tuple[Kind, ...] = (
    Kind("generate stream", "/api/generate", {"model": MODEL, "prompt": "hi"}, True, False),
    Kind(
        "generate",
        "/api/generate",
        {"model": MODEL, "prompt": "hi", "stream": False},
        False,
        False,
    ),
    Kind("chat stream", "/api/chat", {"model": MODEL, "messages": _MESSAGES}, True, False),
    Kind(
        "v1 chat stream",
        "/v1/chat/completions",
        {"model": MODEL, "messages": _MESSAGES, "stream": True},
        True,
        True,
    ),
    Kind("v1 chat", "/v1/chat/completions", {"model": MODEL, "messages": _MESSAGES}, False, True),
)
STREAMS = tuple(k for k in KINDS if k.stream)


@dataclass
class Outcome:
    """How one request ended: ``complete``, ``error`` (a clear one) or ``bad`` (anything else)."""

    kind: Kind
    verdict: str
    why: str
    status: int | None = None
    backend: str | None = None
    mid_stream: bool = False  # an error delivered as the stream's last line or event
    started: float = 0.0
    seconds: float = 0.0
    tail: str = ""

    def __str__(self) -> str:
        return (
            f"{self.kind.name} -> {self.verdict}: {self.why} (status {self.status}, "
            f"backend {self.backend}, {self.seconds:.2f}s, tail {self.tail!r})"
        )


def _error_message(data: Any, openai: bool) -> str | None:
    """The message of an Ollama ``{"error": "..."}`` or OpenAI ``{"error": {"message"}}`` body."""
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if openai and isinstance(err, dict):
        err = err.get("message")
    return err if isinstance(err, str) and err else None


def judge(kind: Kind, status: int, headers: httpx.Headers, body: bytes) -> tuple[str, str, bool]:
    """(verdict, why, mid_stream) for a response read to its end."""
    if status >= 400:
        try:
            data = json.loads(body)
        except ValueError:
            return "bad", "error status without a JSON body", False
        message = _error_message(data, kind.openai)
        if message is None:
            return "bad", "error status without an error message in the expected shape", False
        if status == 503 and "retry-after" not in headers:
            return "bad", "503 without Retry-After", False
        return "error", f"{status}: {message}", False
    if status != 200:
        return "bad", f"unexpected status {status}", False
    if not body:
        return "bad", "empty 200", False
    if not kind.stream:
        try:
            data = json.loads(body)
        except ValueError:
            return "bad", "200 with a body that is not JSON (truncated?)", False
        if kind.openai:
            choices = data.get("choices") if isinstance(data, dict) else None
            if choices and choices[0].get("finish_reason"):
                return "complete", "ok", False
        elif isinstance(data, dict) and data.get("done") is True:
            return "complete", "ok", False
        return "bad", "200 without a finished answer", False
    if kind.openai:
        return _judge_sse(body)
    return _judge_ndjson(body)


def _judge_ndjson(body: bytes) -> tuple[str, str, bool]:
    if not body.endswith(b"\n"):
        return "bad", "stream cut inside a line", False
    lines = body.splitlines()
    try:
        parsed = [json.loads(line) for line in lines]
    except ValueError:
        return "bad", "a stream line that is not JSON", False
    last = parsed[-1]
    if any("error" in p for p in parsed[:-1]):
        return "bad", "an error line that is not the last", False
    if last.get("done") is True:
        return "complete", "ok", False
    message = _error_message(last, False)
    if message is not None:
        return "error", f"mid-stream: {message}", True
    return "bad", "stream ended without done or an error line (silent truncation)", False


def _sse_events(body: bytes) -> tuple[list[bytes], bool]:
    """The data of each event of an SSE body (per the spec: data lines, dispatched by a blank
    line), and whether data was left without its blank line."""
    events: list[bytes] = []
    data: list[bytes] = []
    for raw in body.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            if data:
                events.append(b"\n".join(data))
                data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
    return events, bool(data)


def _judge_sse(body: bytes) -> tuple[str, str, bool]:
    events, unfinished = _sse_events(body)
    if unfinished or not body.endswith(b"\n\n"):
        return "bad", "stream cut inside an event", False
    if not events:
        return "bad", "a stream without events", False
    if events[-1] == b"[DONE]":
        return "complete", "ok", False
    try:
        parsed = [json.loads(e) for e in events]
    except ValueError:
        return "bad", "an event that is neither [DONE] nor JSON", False
    if any(_error_message(p, True) is not None for p in parsed[:-1]):
        return "bad", "an error event that is not the last", False
    message = _error_message(parsed[-1], True)
    if message is not None:
        return "error", f"mid-stream: {message}", True
    return "bad", "stream ended without [DONE] or an error event (silent truncation)", False


def request_once(client: httpx.Client, kind: Kind, bound_s: float) -> Outcome:
    """Send one request and judge it; longer than ``bound_s`` counts as hung."""
    started = time.monotonic()
    outcome = Outcome(kind, "bad", "", started=started)
    chunks: list[bytes] = []
    try:
        with client.stream("POST", kind.path, json=kind.body) as resp:
            outcome.status = resp.status_code
            outcome.backend = resp.headers.get("x-corral-backend")
            for chunk in resp.iter_raw():
                chunks.append(chunk)
                if time.monotonic() - started > bound_s:
                    outcome.why = f"hung: still streaming after {bound_s:g}s"
                    break
            else:
                body = b"".join(chunks)
                outcome.verdict, outcome.why, outcome.mid_stream = judge(
                    kind, resp.status_code, resp.headers, body
                )
    except httpx.TimeoutException as exc:
        outcome.why = f"hung: {type(exc).__name__} after {time.monotonic() - started:.2f}s"
    except httpx.HTTPError as exc:
        outcome.why = f"transport error: {type(exc).__name__}: {exc}"
    outcome.seconds = time.monotonic() - started
    outcome.tail = b"".join(chunks)[-200:].decode(errors="replace")
    return outcome


class Load:
    """``workers`` client threads sending a mix of requests through corral until stopped (or
    ``limit`` requests in all), each judged by :func:`judge`."""

    def __init__(
        self,
        url: str,
        *,
        workers: int = 6,
        kinds: Iterable[Kind] = KINDS,
        bound_s: float = 10.0,
        limit: int | None = None,
    ) -> None:
        self.url = url
        self.kinds = tuple(kinds)
        self.bound_s = bound_s
        self.limit = limit
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._issued = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)
        ]

    def _next(self) -> bool:
        with self._lock:
            if self._stop.is_set() or (self.limit is not None and self._issued >= self.limit):
                return False
            self._issued += 1
            return True

    def _work(self, worker: int) -> None:
        # Read timeout: a request silent this long is hung (corral's own timeouts are shorter).
        timeout = httpx.Timeout(self.bound_s, connect=2.0)
        with httpx.Client(base_url=self.url, timeout=timeout) as client:
            i = worker
            while self._next():
                outcome = request_once(client, self.kinds[i % len(self.kinds)], self.bound_s)
                with self._lock:
                    self.outcomes.append(outcome)
                i += 1

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for(self, n: int, timeout_s: float = 10.0) -> None:
        """Wait until at least ``n`` more requests have ended."""
        target = self.count() + n
        assert poll(lambda: self.count() >= target, timeout_s), f"load stalled below {target}"

    def stop(self) -> list[Outcome]:
        """Stop issuing, let the requests in flight end (bounded), return every outcome."""
        self._stop.set()
        return self.join()

    def join(self) -> list[Outcome]:
        deadline = time.monotonic() + self.bound_s + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in self._threads)
        assert not stuck, f"{stuck} client threads still waiting after {self.bound_s + 5:g}s"
        with self._lock:
            return list(self.outcomes)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.join()


def run_load(url: str, n: int, **kw: Any) -> list[Outcome]:
    """Send ``n`` requests with the mix and wait for all of them."""
    load = Load(url, limit=n, **kw).start()
    return load.join()


def assert_all_clear(outcomes: list[Outcome]) -> None:
    """Every request got a complete answer or a clear error."""
    assert outcomes, "no request ran"
    bad = [o for o in outcomes if o.verdict == "bad"]
    if bad:
        shown = "\n  ".join(str(o) for o in bad[:10])
        pytest.fail(f"{len(bad)} of {len(outcomes)} requests ended badly:\n  {shown}")


def assert_cut_streams(outcomes: list[Outcome], backend_id: str, why: str) -> list[Outcome]:
    """Every error among ``outcomes`` is a stream of ``backend_id`` ended by an error line or
    event saying ``why``; returns them (there must be some)."""
    cut = [o for o in outcomes if o.verdict == "error"]
    assert cut, f"no stream met the fault of backend {backend_id}"
    for o in cut:
        assert o.mid_stream, o
        assert o.backend == backend_id, o
        assert why in o.why, o
    return cut
