"""The other APIs Ollama speaks on top of chat: OpenAI's Responses (``/v1/responses``, since
v0.13.3) and Anthropic's Messages (``/v1/messages``, since v0.14). Each is Ollama's chat behind
a translation, so the simulation is the chat's: the same prompt, tokens, timing and faults, in
the other API's shapes (SSE with ``event:`` lines when streaming)."""

from __future__ import annotations

import random
import time
from typing import Any

from corral.asgi import form_field
from corral.sim.core import Job, Sim, end_by_fault, num_predict
from corral.sim.text import chat_tokens, text_of, token
from corral.sim.v1 import lookup
from corral.sim.wire import SSE_TYPE, Exchange, HTTPError, check_types, decode_body, dumps


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _chat(system: Any, messages: list[Any]) -> list[dict[str, str]]:
    """The native chat messages these requests become."""
    out = [{"role": "system", "content": _text(system)}] if system else []
    for m in messages:
        if isinstance(m, dict):
            out.append({"role": str(m.get("role") or "user"), "content": _text(m.get("content"))})
    return out


def _max_tokens(value: Any, tokens: int) -> dict[str, Any]:
    """A token ceiling: the answer stops at it only when it would be longer (the model's own
    end comes first otherwise), as an LLM's does."""
    if isinstance(value, int) and not isinstance(value, bool) and value < tokens:
        return {"num_predict": value}
    return {}


# OpenAI Responses ---------------------------------------------------------------------------


async def responses(sim: Sim, ex: Exchange) -> None:
    """POST /v1/responses (stateless: ``input`` is a string or a list of messages)."""
    body = decode_body(ex.raw, "ResponsesRequest")
    check_types(body, "ResponsesRequest", {"model": "string", "stream": "bool"})
    raw_name, key, model = lookup(sim, ex, body)
    given = body.get("input")
    if isinstance(given, str):
        messages: list[Any] = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given:
        messages = given
    else:
        raise HTTPError(400, "input is required")
    options = _max_tokens(body.get("max_output_tokens"), sim.config.tokens)
    n, reason = num_predict(options, sim.config.tokens)
    tokens = chat_tokens(_chat(body.get("instructions"), messages))
    rid = f"resp_{random.randint(0, 999_999):06d}"
    mid = f"msg_{random.randint(0, 999_999):06d}"
    created = int(time.time())
    seq = iter(range(1 << 30))

    def response(status: str, text: str | None, usage: dict[str, int] | None) -> dict[str, Any]:
        output = []
        if text is not None:
            content = [{"type": "output_text", "text": text, "annotations": []}]
            output.append(
                {
                    "type": "message",
                    "id": mid,
                    "status": "completed",
                    "role": "assistant",
                    "content": content,
                }
            )
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "model": raw_name,
            "output": output,
            "usage": usage,
        }

    def usage(prompt: int, out: int) -> dict[str, int]:
        return {"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out}

    async def opening() -> None:
        created = {
            "type": "response.created",
            "response": response("in_progress", None, None),
            "sequence_number": next(seq),
        }
        item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant"}
        added = {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "content": []},
            "sequence_number": next(seq),
        }
        await ex.emit(
            _event("response.created", created) + _event("response.output_item.added", added),
            SSE_TYPE,
        )

    async def delta(i: int) -> None:
        if i == 0:
            await opening()
        data = {
            "type": "response.output_text.delta",
            "item_id": mid,
            "output_index": 0,
            "content_index": 0,
            "delta": token(i),
            "sequence_number": next(seq),
        }
        await ex.emit(_event("response.output_text.delta", data), SSE_TYPE)

    stream = body.get("stream") is True
    async with Job(sim, ex, key, model, None, options) as job:
        await job.prompt(tokens)
        fault = await job.tokens(n, delta if stream else None)
        if fault is not None:
            error = {"type": "error", "code": None, "message": "model error", "param": None}
            await end_by_fault(ex, fault, _event("error", error))
            return
        done = response("completed", text_of(n), usage(len(tokens), n))
        done["incomplete_details"] = {"reason": "max_output_tokens"} if reason == "length" else None
        if not stream:
            await ex.json(done)
            return
        if n == 0:
            await opening()
        tail = _event(
            "response.output_text.done",
            {
                "type": "response.output_text.done",
                "item_id": mid,
                "output_index": 0,
                "content_index": 0,
                "text": text_of(n),
                "sequence_number": next(seq),
            },
        ) + _event(
            "response.completed",
            {"type": "response.completed", "response": done, "sequence_number": next(seq)},
        )
        await ex.end(tail, SSE_TYPE)


# Anthropic Messages -------------------------------------------------------------------------


async def messages(sim: Sim, ex: Exchange) -> None:
    """POST /v1/messages."""
    body = decode_body(ex.raw, "MessagesRequest")
    check_types(
        body,
        "MessagesRequest",
        {"model": "string", "messages": "array", "stream": "bool", "max_tokens": "int"},
    )
    if not body.get("messages"):
        raise HTTPError(400, "messages: at least one message is required")
    raw_name, key, model = lookup(sim, ex, body)
    options = _max_tokens(body.get("max_tokens"), sim.config.tokens)
    n, reason = num_predict(options, sim.config.tokens)
    tokens = chat_tokens(_chat(body.get("system"), body["messages"]))
    mid = f"msg_{random.randint(0, 999_999):06d}"
    stop = "max_tokens" if reason == "length" else "end_turn"
    message: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": raw_name,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": len(tokens), "output_tokens": 0},
    }

    async def opening() -> None:
        await ex.emit(
            _event("message_start", {"type": "message_start", "message": message})
            + _event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            SSE_TYPE,
        )

    async def delta(i: int) -> None:
        if i == 0:
            await opening()
        data = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": token(i)},
        }
        await ex.emit(_event("content_block_delta", data), SSE_TYPE)

    stream = body.get("stream") is True
    async with Job(sim, ex, key, model, None, options) as job:
        await job.prompt(tokens)
        fault = await job.tokens(n, delta if stream else None)
        if fault is not None:
            error = {"type": "error", "error": {"type": "api_error", "message": "model error"}}
            await end_by_fault(ex, fault, _event("error", error))
            return
        if not stream:
            message["content"] = [{"type": "text", "text": text_of(n)}]
            message["stop_reason"] = stop
            message["usage"] = {"input_tokens": len(tokens), "output_tokens": n}
            await ex.json(message)
            return
        if n == 0:
            await opening()
        tail = (
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": n},
                },
            )
            + _event("message_stop", {"type": "message_stop"})
        )
        await ex.end(tail, SSE_TYPE)


# OpenAI audio transcriptions ----------------------------------------------------------------


async def transcriptions(sim: Sim, ex: Exchange) -> None:
    """POST /v1/audio/transcriptions (multipart: ``model``, ``file``): the "transcript" is the
    configured answer, after a prompt as long as the upload (a token per 4 KiB)."""
    content_type = ""
    for key, value in ex.scope["headers"]:
        if key == b"content-type":
            content_type = value.decode("latin-1")
    raw_name = form_field(ex.raw, content_type, "model") or ""
    body = {"model": raw_name}
    raw_name, key, model = lookup(sim, ex, body)
    n, _ = num_predict({}, sim.config.tokens)
    tokens = ("audio",) * max(1, len(ex.raw) // 4096)
    async with Job(sim, ex, key, model, None, {}) as job:
        await job.prompt(tokens)
        fault = await job.tokens(n, None)
        if fault is not None:
            await end_by_fault(ex, fault, b"")
            return
        await ex.json({"text": text_of(n)})
