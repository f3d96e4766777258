"""The soak's load: a seeded mix of Ollama and OpenAI requests, streamed and not, sent open loop
(Poisson arrivals) with a cap on those in flight, and a verdict for every answer.

Verdicts: ``complete`` (the whole answer), ``error`` (a clear error: status >= 400 with an
error body in the route's shape, or a stream whose last line or event is an error), or
``unanswered`` (hung past the bound, cut without an error line, or anything else a client
could not make sense of). The soak's contract: no ``unanswered`` at all.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from _open_loop import send_at

MODELS = ("llama3.2", "qwen2.5:7b")
COMPLETE, ERROR, UNANSWERED = "complete", "error", "unanswered"


@dataclass(frozen=True)
class Kind:
    """One kind of request: where it goes, whether it streams, whose error shape it uses."""

    name: str
    path: str
    stream: bool
    openai: bool
    weight: float

    def body(self, model: str, tokens: int) -> dict[str, Any]:
        if self.openai:
            messages = [{"role": "user", "content": "hi"}]
            return {
                "model": model,
                "messages": messages,
                "stream": self.stream,
                "max_tokens": tokens,
            }
        body: dict[str, Any] = {
            "model": model,
            "stream": self.stream,
            "options": {"num_predict": tokens},
        }
        if self.path.endswith("/chat"):
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        return body


KINDS = (
    Kind("generate stream", "/api/generate", True, False, 3),
    Kind("generate", "/api/generate", False, False, 2),
    Kind("chat stream", "/api/chat", True, False, 2),
    Kind("v1 chat stream", "/v1/chat/completions", True, True, 2),
    Kind("v1 chat", "/v1/chat/completions", False, True, 1),
)


@dataclass(frozen=True)
class Request:
    """One arrival of the seeded schedule."""

    at_s: float
    kind: Kind
    model: str
    tokens: int


def schedule(seed: int, rate: float, duration_s: float, tokens: tuple[int, int]) -> list[Request]:
    """Poisson arrivals at ``rate`` per second for ``duration_s``, kinds by weight, models
    70/30, token counts uniform in ``tokens``. The same seed gives the same requests."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(seed)
    weights = [k.weight for k in KINDS]
    out: list[Request] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        kind = rng.choices(KINDS, weights)[0]
        model = MODELS[0] if rng.random() < 0.7 else MODELS[1]
        out.append(Request(t, kind, model, rng.randint(*tokens)))
        t += rng.expovariate(rate)
    return out


def _message(data: Any, openai: bool) -> str | None:
    """The message of Ollama's ``{"error": "..."}`` or OpenAI's ``{"error": {"message"}}``."""
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if openai:  # OpenAI's shape only: a bare string is Ollama's
        err = err.get("message") if isinstance(err, dict) else None
    return err if isinstance(err, str) and err else None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def judge(kind: Kind, status: int, body: bytes) -> tuple[str, str]:
    """(verdict, why) for a response read to its end."""
    if status >= 400:
        message = _message(_json(body), kind.openai)
        if message is None:
            return UNANSWERED, f"{status} without an error body"
        return ERROR, f"{status}: {message[:60]}"
    if status != 200 or not body:
        return UNANSWERED, f"{status} with {'a' if body else 'no'} body"
    if not kind.stream:
        data = _json(body)
        if not isinstance(data, dict):
            return UNANSWERED, "200 with a body that is not JSON"
        if kind.openai:
            choices = data.get("choices")
            first = choices[0] if isinstance(choices, list) and choices else None
            finished = isinstance(first, dict) and bool(first.get("finish_reason"))
        else:
            finished = data.get("done") is True
        return (COMPLETE, "ok") if finished else (UNANSWERED, "200 without a finished answer")
    if kind.openai:
        if not body.endswith(b"\n\n"):
            return UNANSWERED, "stream cut inside an event"
        last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].removeprefix(b"data: ")
        if last == b"[DONE]":
            return COMPLETE, "ok"
    else:
        if not body.endswith(b"\n"):
            return UNANSWERED, "stream cut inside a line"
        last = body.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        if (_json(last) or {}).get("done") is True:
            return COMPLETE, "ok"
    message = _message(_json(last), kind.openai)
    if message is not None:
        return ERROR, f"mid-stream: {message[:60]}"
    return UNANSWERED, "stream ended without its end or an error line"


@dataclass
class Outcome:
    """How one request ended, in seconds since the run's zero."""

    kind: str
    model: str
    sent_s: float
    done_s: float
    verdict: str
    why: str
    status: int = 0
    backend: str | None = None

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s


async def send(
    session: aiohttp.ClientSession, url: str, req: Request, t0: float, bound_s: float
) -> Outcome:
    """One request, read to its end within ``bound_s``, judged."""
    perf = time.perf_counter
    sent = perf() - t0
    status, backend, body = 0, None, b""
    verdict, why = UNANSWERED, ""
    try:
        async with asyncio.timeout(bound_s):
            body_json = req.kind.body(req.model, req.tokens)
            async with session.post(url + req.kind.path, json=body_json) as r:
                status, backend = r.status, r.headers.get("X-Corral-Backend")
                body = await r.read()
        verdict, why = judge(req.kind, status, body)
    except TimeoutError:
        why = f"hung: no end after {bound_s:g} s"
    except aiohttp.ClientError as exc:
        why = f"cut: {type(exc).__name__}"
    return Outcome(req.kind.name, req.model, sent, perf() - t0, verdict, why, status, backend)


async def drive(
    url: str, requests: list[Request], t0: float, bound_s: float, max_outstanding: int
) -> tuple[list[Outcome], int]:
    """Send every request at its time (open loop); arrivals beyond ``max_outstanding`` in
    flight are skipped and counted. Returns the outcomes and the skipped count."""
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:

        async def one(req: Request) -> None:
            outcomes.append(await send(session, url, req, t0, bound_s))

        skipped = await send_at(((r.at_s, r) for r in requests), one, t0, max_outstanding)
    return outcomes, skipped
