"""Fan-out model management: one management request sent to many backends, answers merged.

``pull``, ``push``, ``create``, ``copy``, ``delete`` and ``HEAD|POST /api/blobs/{digest}`` go to
every healthy, non-draining backend, or only to those named with ``?backend=ID`` (repeatable;
a named backend may be draining, not down). Shapes:

- pull, push, create always stream from the backends, whatever the client asked: progress lines
  keep the idle timeout quiet through downloads that take minutes. With ``stream`` true (Ollama's
  default) the client gets one NDJSON stream: each backend's progress lines with ``"backend"``
  added, as they arrive; ``{"backend", "status": "backend finished"}`` or ``{"backend",
  "error"}`` per backend as it ends; then the only line that says ``"status": "success"``
  (with ``"skipped": [ids]`` for backends that were down or draining), or ``{"error",
  "failed": [ids]}``. With ``stream: false`` one object: ``{"status": "success", "backends":
  {id: {"status"}}}`` (and ``skipped``).
- copy and delete succeed where the model existed: a backend that answers 404 (it never had
  it) did its part, and the answer is Ollama's 404 only when no backend had it. They answer 200
  with an empty body when every backend took part, else ``{"skipped": [ids]}``; blobs 200
  (201 when some backend stored it).
- When some target failed the others still run to the end, and the answer is
  ``{"error", "failed": [ids], "backends": {id: {"status"} | {"error"}}}`` with the failures'
  own status when they all agree (404 when every target said not found, 500 for Ollama's failed
  pull, 400 for a bad name, 504 when all timed out), else 502. A stream whose every target failed
  before any progress answers the same way: an early error keeps a real status, as in Ollama.
- A backend that succeeded with pull, create, copy or delete is probed at once, before its
  success line, so routing sees its new model list.
- Blob uploads stream to every target at the pace of the slowest; there is no size cap.
- A client that goes away cancels every upstream request. The ``ollama`` package raises at the
  first line with an ``error`` (a failed backend's line) and closes the stream, which cancels
  the backends still pulling; with ``stream: false`` it waits for all and raises on the status.
- These routes need the admin key (``admin_denial``) unless ``auth.model_management`` is
  ``"clients"``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import structlog

from corral.asgi import Headers, Receive, Scope, Send, header, unless_gone
from corral.auth import admin_refusal
from corral.errors import CorralError, UnknownBackendError, UpstreamError, UpstreamTimeoutError
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model, shown_name
from corral.fleet.health import HealthChecker
from corral.fleet.replays import REPLAYED, Replay, ReplayLedger
from corral.metrics import Metrics
from corral.proxy.listing import Listing
from corral.proxy.relay import send_bytes
from corral.upstream import Upstream, lines

log = structlog.get_logger("corral.fanout")

STREAMING = frozenset({"pull", "push", "create"})
# A backend's own completion line in a merged progress stream.
FINISHED = "backend finished"
# Actions that change a backend's model list: it is probed after each success.
CHANGES_MODELS = frozenset({"pull", "create", "copy", "delete"})
_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
_JSON = (b"content-type", b"application/json; charset=utf-8")
_NDJSON = (b"content-type", b"application/x-ndjson")
_BROKEN = (UpstreamError, ValueError)
BodyReader = Callable[[], Awaitable[bytes | None]]


@dataclass(slots=True)
class Outcome:
    """How one backend ended: its (HTTP-like) status, and the error when it failed."""

    backend_id: str
    status: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _RefusedError(CorralError):
    """Answer at once with ``status`` and ``{"error": message}``; nothing was sent upstream."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers
        super().__init__(message)


@dataclass(slots=True)
class _Job:
    """One management request: what is sent upstream and where, and what it answers with."""

    action: str
    method: str
    path: str
    headers: Headers  # forwarded upstream
    targets: list[BackendState]
    reply_headers: list[tuple[bytes, bytes]]
    # Backends that took no part (down, draining, ejected): named in the answer.
    skipped: list[str] = field(default_factory=list)
    model: str | None = None  # the model (or blob digest) the operation is about

    @property
    def refresh(self) -> bool:
        return self.action in CHANGES_MODELS


class FanOut:
    """Sends a management request to its target backends and merges their answers."""

    def __init__(
        self,
        registry: BackendRegistry,
        upstream: Upstream,
        health: HealthChecker,
        *,
        admin_key: str | None,
        open_to_clients: bool,
        ledger: ReplayLedger | None = None,
        metrics: Metrics | None = None,
        body_timeout_s: float = 60.0,
        listing: Listing | None = None,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.health = health
        self.admin_key = admin_key
        self.open_to_clients = open_to_clients
        self.ledger = ledger if ledger is not None else ReplayLedger()
        self.metrics = metrics
        self.body_timeout_s = body_timeout_s  # the longest pause in a blob upload
        self.listing = listing  # its cached model lists are stale once a model changed
        self._replaying: dict[str, asyncio.Task[None]] = {}

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        request_id: str,
        headers: Headers,
        read_body: BodyReader,
    ) -> None:
        """Serve one management request (the method is already checked against the path)."""
        started = time.perf_counter()
        path: str = scope["path"]
        action, method = path.split("/")[2], scope["method"]
        base = [(b"x-request-id", request_id.encode())]
        # corral reads the progress lines itself: no compressed answers.
        headers = [(k, v) for k, v in headers if k != b"accept-encoding"]
        model: str | None = None
        data: dict[str, Any] = {}
        body: bytes | None = None
        try:
            self._authorize(scope)
            if action == "blobs":
                model = path[len("/api/blobs/") :]
                if not _DIGEST.match(model):
                    raise _RefusedError(400, "invalid digest format", [])
            else:
                body = await read_body()
                if body is None:  # answered already (413) or the client left
                    return
                data = _parse(body)
                name = data.get("model") or data.get("name") or data.get("source")
                model = shown_name(name) if isinstance(name, str) else None
            targets = self.targets(scope["query_string"])
        except _RefusedError as exc:
            payload = {"error": str(exc)}
            await _reply(send, exc.status, payload, [*base, *exc.headers], head=method == "HEAD")
            return
        base.append((b"x-corral-backend", ",".join(b.id for b in targets).encode()))
        job = _Job(action, method, path, headers, targets, base, self.skipped(targets, scope))
        job.model = model
        result: tuple[int, list[Outcome]] | None
        with self.registry.bringing(_brings(action, data)):
            if action in STREAMING:
                upstream_body = json.dumps({**data, "stream": True}).encode()
                stream = data.get("stream") is not False
                result = await unless_gone(
                    receive, self._progress(send, job, upstream_body, stream)
                )
            elif action == "blobs" and method == "POST":
                length = header(scope, b"content-length")
                if length is not None:
                    headers.append((b"content-length", length.encode("latin-1")))
                result = await self._upload(receive, send, job)
            else:
                result = await unless_gone(receive, self._simple(send, job, body))
        status, outcomes = result if result is not None else (499, [])
        if result is not None:
            self._owe(job, data, outcomes)
        log.info(
            "fan-out",
            request_id=request_id,
            action=action,
            model=model,
            targets=[b.id for b in targets],
            failed=[o.backend_id for o in outcomes if not o.ok],
            status=status,
            duration_s=round(time.perf_counter() - started, 6),
        )

    def _authorize(self, scope: Scope) -> None:
        if self.open_to_clients:
            return
        refused = admin_refusal(self.admin_key, scope)
        if refused is not None:
            raise _RefusedError(*refused)

    def skipped(self, targets: list[BackendState], scope: Scope) -> list[str]:
        """Backends left out of an operation meant for the whole fleet (none when the client
        named its targets with ``?backend=``)."""
        if b"backend=" in scope["query_string"]:
            return []
        chosen = {b.id for b in targets}
        return [b.id for b in self.registry.all() if b.id not in chosen]

    def targets(self, query: bytes) -> list[BackendState]:
        """The backends named by ``?backend=ID`` (healthy ones), else every available one."""
        named = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("backend")
        retry = [(b"retry-after", b"1")]
        if not named:
            now = time.monotonic()
            found = [b for b in self.registry.all() if b.available(now)]
            if not found:
                raise _RefusedError(503, "no healthy backend available", retry)
            return found
        chosen: list[BackendState] = []
        for backend_id in dict.fromkeys(named):
            try:
                backend = self.registry.get(backend_id)
            except UnknownBackendError as exc:
                raise _RefusedError(404, str(exc), []) from None
            if not backend.healthy:
                raise _RefusedError(503, f"backend {backend_id!r} is down", retry)
            chosen.append(backend)
        return chosen

    def _held_by_skipped(self, job: _Job) -> bool:
        """A backend left out of the operation listed the model when last seen."""
        if not job.model or not job.skipped:
            return False
        key = normalize_model(job.model)
        return any(
            self.registry.get(bid).has_model(key) for bid in job.skipped if bid in self.registry
        )

    # Replays ---------------------------------------------------------------------------------

    def _owe(self, job: _Job, data: dict[str, Any], outcomes: list[Outcome]) -> None:
        """Remember which backends missed a fleet-wide pull, delete or copy that took effect
        somewhere (or, for a delete or copy, that a left-out backend may hold the model)."""
        if job.action not in REPLAYED:
            return
        self.ledger.settle([o.backend_id for o in outcomes if o.ok], job.action, data)
        took_effect = any(o.ok for o in outcomes) or (
            job.action != "pull" and self._held_by_skipped(job)
        )
        if not took_effect:
            return
        owed = [(bid, self._why_skipped(bid)) for bid in job.skipped]
        owed += [(o.backend_id, "failed") for o in outcomes if not o.ok and o.status >= 500]
        if not owed:
            return
        model = self.ledger.add(owed, job.action, data)
        log.warning(
            "fan-out missed; replay owed",
            action=job.action,
            model=model,
            backends=[bid for bid, _ in owed],
        )

    def _why_skipped(self, backend_id: str) -> str:
        backend = self.registry.get(backend_id)
        return "down" if not backend.healthy else "draining" if backend.draining else "ejected"

    async def run_replays(self, every_s: float = 1.0) -> None:
        """Replay owed operations as backends become available, forever."""
        while True:
            try:
                self.replay_due()
            except Exception:
                log.exception("replay round failed")
            await asyncio.sleep(every_s)

    def replay_due(self) -> list[asyncio.Task[None]]:
        """Start replaying on every available backend that owes something and is not replaying
        already (one task per backend; its operations run in order). Returns the new tasks."""
        now = time.monotonic()
        started = []
        for bid in self.ledger.backends():
            if bid in self._replaying:
                continue
            if bid not in self.registry:
                self.ledger.forget(bid)
                continue
            backend = self.registry.get(bid)
            owed = self.ledger.owed(bid)
            if not backend.probed or not backend.available(now) or owed[0].not_before > now:
                continue
            task = asyncio.create_task(self._replay(backend))
            self._replaying[bid] = task
            started.append(task)
        return started

    async def _replay(self, backend: BackendState) -> None:
        try:
            for replay in self.ledger.owed(backend.id):
                if not await self._replay_one(backend, replay):
                    return  # later operations wait: order matters (a copy reads a pull)
        finally:
            self._replaying.pop(backend.id, None)

    async def _replay_one(self, backend: BackendState, replay: Replay) -> bool:
        """Replay one operation; True when the backend need not be asked again."""
        action = replay.action
        job = _Job(
            action,
            "DELETE" if action == "delete" else "POST",
            f"/api/{action}",
            [(b"content-type", b"application/json")],
            [backend],
            [],
        )
        if action == "pull":
            body = json.dumps({**replay.body, "stream": True}).encode()
            outcome = await self._read_progress(job, backend, body, _ignore)
            if outcome.ok:
                await self._refresh(backend)
        else:
            outcome = await self._call(job, backend, json.dumps(replay.body).encode())
        fields = {"backend": backend.id, "action": action, "model": replay.model}
        if outcome.ok or _absent(outcome):
            # A 404: the model to delete (or the copy's source) is not there; nothing to do.
            self.ledger.done(replay)
            self._count(replay, "done")
            log.info("replayed", **fields, status=outcome.status)
            return True
        if outcome.status < 500:  # refused (a bad name, say): asking again will not help
            self.ledger.done(replay)
        elif self.ledger.failed(replay, str(outcome.error), time.monotonic()):
            self._count(replay, "failed")
            log.warning("replay failed; tried again later", **fields, error=outcome.error)
            return False
        self._count(replay, "abandoned")
        log.error("replay given up", **fields, error=outcome.error, attempts=replay.attempts)
        return True

    def _count(self, replay: Replay, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.replays.labels(replay.backend, replay.action, outcome).inc()

    async def stop_replays(self) -> None:
        await _cancel(list(self._replaying.values()))

    # pull, push, create ---------------------------------------------------------------------

    async def _progress(
        self, send: Send, job: _Job, body: bytes, stream: bool
    ) -> tuple[int, list[Outcome]]:
        # Events: a progress line, None (a backend answered 2xx: the stream may begin), an Outcome.
        events: asyncio.Queue[bytes | Outcome | None] = asyncio.Queue(256)
        tasks = [asyncio.create_task(self._progress_one(job, b, body, events)) for b in job.targets]
        outcomes: list[Outcome] = []
        held: list[bytes] = []
        started = False
        try:
            while len(outcomes) < len(tasks):
                event = await events.get()
                if isinstance(event, Outcome):
                    outcomes.append(event)
                    held.append(_line(_finish_line(event)))
                elif event is not None:
                    held.append(event)
                if not stream or not (started or event is None):
                    continue
                if not started:
                    start = [*job.reply_headers, _NDJSON]
                    await send({"type": "http.response.start", "status": 200, "headers": start})
                    started = True
                for chunk in held:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                held.clear()
        finally:
            await _cancel(tasks)
        outcomes = _in_order(outcomes, job.targets)
        status, report = 200, {"status": "success", "backends": _by_backend(outcomes)}
        if job.skipped:
            report["skipped"] = job.skipped
        if not all(o.ok for o in outcomes):
            status, report = _report(job.action, outcomes)
        if started:
            del report["backends"]  # told line by line already
            await send({"type": "http.response.body", "body": _line(report), "more_body": False})
            return 200, outcomes
        await _reply(send, status, report, job.reply_headers)
        return status, outcomes

    async def _progress_one(
        self,
        job: _Job,
        backend: BackendState,
        body: bytes,
        events: asyncio.Queue[bytes | Outcome | None],
    ) -> None:
        outcome = await self._read_progress(job, backend, body, events.put)
        if outcome.ok and job.refresh:
            await self._refresh(backend)
        await events.put(outcome)

    async def _read_progress(
        self,
        job: _Job,
        backend: BackendState,
        body: bytes,
        emit: Callable[[bytes | None], Awaitable[None]],
    ) -> Outcome:
        bid = backend.id
        try:
            resp = await self.upstream.open("POST", backend.url + job.path, job.headers, body)
        except _BROKEN as exc:
            return _broken(bid, exc)
        try:
            if not 200 <= resp.status < 300:
                return Outcome(
                    bid, resp.status, _error_text(await resp.read_all(65536), resp.status)
                )
            await emit(None)
            success = False
            async for raw in lines(resp):  # one NDJSON line at a time
                if not raw.strip():
                    continue
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    return Outcome(bid, 502, "the backend sent a progress line that is no object")
                if obj.get("error"):
                    # Ollama's waitForStream turns an error mid-stream into a 500.
                    return Outcome(bid, 500, str(obj["error"]))
                if obj.get("status") == "success":
                    success = True  # reported as this backend's own finish line
                    continue
                obj.pop("backend", None)
                await emit(_line({"backend": bid, **obj}))
            if success:
                return Outcome(bid, 200)
            return Outcome(bid, 502, "the backend's stream ended before success")
        except _BROKEN as exc:
            return _broken(bid, exc)
        finally:
            resp.close()

    # copy, delete, blobs --------------------------------------------------------------------

    async def _simple(self, send: Send, job: _Job, body: bytes | None) -> tuple[int, list[Outcome]]:
        outcomes = await asyncio.gather(*(self._call(job, b, body) for b in job.targets))
        return await self._answer(send, job, list(outcomes))

    async def _upload(
        self, receive: Receive, send: Send, job: _Job
    ) -> tuple[int, list[Outcome]] | None:
        feeds = [_Feed(self.upstream.timeouts.idle_s) for _ in job.targets]

        async def one(backend: BackendState, feed: _Feed) -> Outcome:
            try:
                return await self._call(job, backend, feed.chunks())
            finally:
                feed.close()

        pairs = zip(job.targets, feeds, strict=True)
        tasks = [asyncio.create_task(one(b, f)) for b, f in pairs]
        try:
            if not await _pump(receive, feeds, self.body_timeout_s):
                return None
            outcomes = await unless_gone(receive, asyncio.gather(*tasks))
        except TimeoutError:  # the client stopped sending: nginx's client_body_timeout
            if self.metrics is not None:
                self.metrics.child(self.metrics.edge_refusals, "body_timeout").inc()
            message = f"request body timeout: nothing received for {self.body_timeout_s:g}s"
            closing = [*job.reply_headers, (b"connection", b"close")]
            await _reply(send, 408, {"error": message}, closing)
            return 408, []
        finally:
            await _cancel(tasks)
        return None if outcomes is None else await self._answer(send, job, list(outcomes))

    async def _answer(
        self, send: Send, job: _Job, outcomes: list[Outcome]
    ) -> tuple[int, list[Outcome]]:
        if job.action in ("copy", "delete") and (
            not all(_absent(o) for o in outcomes) or self._held_by_skipped(job)
        ):
            # A backend that never had the model did its part: success where it existed, and
            # Ollama's 404 only when no backend had it.
            outcomes = [Outcome(o.backend_id, 200) if _absent(o) else o for o in outcomes]
        if all(o.ok for o in outcomes):
            status = 201 if any(o.status == 201 for o in outcomes) else 200
            payload = {"skipped": job.skipped} if job.skipped else None
            await _reply(send, status, payload, job.reply_headers)
            return status, outcomes
        status, report = _report(job.action, outcomes)
        await _reply(send, status, report, job.reply_headers, head=job.method == "HEAD")
        return status, outcomes

    async def _call(
        self, job: _Job, backend: BackendState, body: bytes | AsyncIterator[bytes] | None
    ) -> Outcome:
        bid = backend.id
        try:
            resp = await self.upstream.open(job.method, backend.url + job.path, job.headers, body)
            try:
                status = resp.status
                payload = await resp.read_all(1 << 20)
            finally:
                resp.close()
        except _BROKEN as exc:
            return _broken(bid, exc)
        if not 200 <= status < 300:
            return Outcome(bid, status, _error_text(payload, status))
        if job.refresh:
            await self._refresh(backend)
        return Outcome(bid, status)

    async def _refresh(self, backend: BackendState) -> None:
        """Read a backend's model list again after it changed; requests waiting for a model
        it now has are dispatched."""
        await self.health.probe(backend)
        if self.listing is not None:
            self.listing.invalidate()
        self.registry.notify()


class _Feed:
    """One backend's copy of an upload body: bounded (backpressure), dropped once it is done
    or once it took no chunk for ``stall_s`` (its upload then ends short and fails)."""

    def __init__(self, stall_s: float) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(8)
        self.stall_s = stall_s
        self.closed = False

    async def put(self, chunk: bytes | None) -> None:
        if self.closed:
            return
        try:
            await asyncio.wait_for(self.queue.put(chunk), self.stall_s)
        except TimeoutError:
            self.close()

    def close(self) -> None:
        # Emptying the queue frees a producer waiting on it (later puts are dropped), and the
        # None ends a reader still waiting for chunks.
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk


async def _pump(receive: Receive, feeds: list[_Feed], timeout_s: float) -> bool:
    """Copy the request body into every feed; False when the client went away, TimeoutError
    when it sent nothing for ``timeout_s``."""
    while True:
        async with asyncio.timeout(timeout_s):
            message = await receive()
        if message["type"] == "http.disconnect":
            return False
        chunk: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        for feed in feeds:
            if chunk:
                await feed.put(chunk)
            if not more:
                await feed.put(None)
        if not more or all(feed.closed for feed in feeds):
            return True


async def _ignore(_: bytes | None) -> None:
    """A replay's progress lines go nowhere."""


def _brings(action: str, data: dict[str, Any]) -> list[str]:
    """The model keys a pull, create or copy is about to add to the fleet."""
    name = data.get("destination") if action == "copy" else data.get("model") or data.get("name")
    if action not in ("pull", "create", "copy") or not isinstance(name, str) or not name:
        return []
    return [normalize_model(name)]


async def _cancel(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _parse(body: bytes) -> dict[str, Any]:
    if not body:
        raise _RefusedError(400, "missing request body", [])
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise _RefusedError(400, f"invalid JSON: {exc}", []) from None
    if not isinstance(data, dict):
        raise _RefusedError(400, "request body must be a JSON object", [])
    if data.get("stream") not in (None, True, False):
        raise _RefusedError(400, "stream must be true or false", [])
    return data


def _report(action: str, outcomes: list[Outcome]) -> tuple[int, dict[str, Any]]:
    """The status and body that report the failed targets (see the module docstring)."""
    failed = [o for o in outcomes if not o.ok]
    statuses = {o.status for o in failed}
    messages = {o.error for o in failed}
    if len(failed) == len(outcomes) and len(messages) == 1:
        message = str(failed[0].error)
    else:
        each = "; ".join(f"{o.backend_id}: {o.error}" for o in failed)
        message = f"{action} failed on {len(failed)} of {len(outcomes)} backends: {each}"
    body = {
        "error": message,
        "failed": [o.backend_id for o in failed],
        "backends": _by_backend(outcomes),
    }
    return (statuses.pop() if len(statuses) == 1 else 502), body


def _by_backend(outcomes: list[Outcome]) -> dict[str, dict[str, str]]:
    return {
        o.backend_id: {"status": "success"} if o.ok else {"error": str(o.error)} for o in outcomes
    }


def _absent(outcome: Outcome) -> bool:
    """The backend answered that it does not have the model."""
    return outcome.status == 404 and not outcome.ok


def _finish_line(outcome: Outcome) -> dict[str, Any]:
    # Not "success": clients stop reading at the first line that says so, and the only one
    # that may is the last, the fleet's.
    if outcome.ok:
        return {"backend": outcome.backend_id, "status": FINISHED}
    return {"backend": outcome.backend_id, "error": outcome.error}


def _in_order(outcomes: list[Outcome], targets: list[BackendState]) -> list[Outcome]:
    rank = {b.id: i for i, b in enumerate(targets)}
    return sorted(outcomes, key=lambda o: rank[o.backend_id])


def _broken(backend_id: str, exc: BaseException) -> Outcome:
    if isinstance(exc, UpstreamTimeoutError):
        return Outcome(backend_id, 504, "the backend did not answer in time")
    if isinstance(exc, ValueError):
        return Outcome(backend_id, 502, f"the backend sent an invalid progress line: {exc}")
    return Outcome(backend_id, 502, f"backend unreachable: {str(exc) or type(exc).__name__}")


def _error_text(payload: bytes, status: int) -> str:
    try:
        error = json.loads(payload).get("error")
    except (ValueError, AttributeError):
        error = None
    text = str(error) if error else payload.decode(errors="replace").strip()[:300]
    return text or f"the backend answered {status}"


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def _reply(
    send: Send,
    status: int,
    payload: dict[str, Any] | None,
    headers: list[tuple[bytes, bytes]],
    *,
    head: bool = False,
) -> None:
    body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    await send_bytes(
        send, status, body, [*headers, _JSON] if payload is not None else headers, head=head
    )


__all__ = ["FanOut", "Outcome"]
