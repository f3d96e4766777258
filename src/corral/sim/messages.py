"""Anthropic's Messages API (``POST /v1/messages``) as Ollama serves it: its chat behind the
translation in Ollama's ``anthropic`` package, so the simulation is the chat's (prompt, tokens,
timing, faults) in Anthropic's shapes.

A stream is SSE with ``event:`` lines: ``message_start`` (its ``input_tokens`` Ollama's
estimate from the request's length, as the real count comes only at the end), a text block
or a ``tool_use`` block (its input in one ``input_json_delta``), ``message_delta`` with the
stop reason and both token counts, ``message_stop``. Empty ``stop_reason`` and
``stop_sequence`` are left out, as Go's ``omitempty`` does. A model failure mid-stream just
ends the stream: Ollama's converter has no event for the native error line."""

from __future__ import annotations

from typing import Any

from corral.sim import tools
from corral.sim.compat import message_text, token_ceiling
from corral.sim.core import Job, Sim, end_by_fault, num_predict
from corral.sim.text import chat_tokens, text_of, token_json
from corral.sim.v1 import lookup
from corral.sim.wire import (
    SSE_TYPE,
    Exchange,
    HTTPError,
    check_types,
    decode_body,
    dumps,
    random_id,
)

_TYPES = {"model": "string", "messages": "array", "stream": "bool", "max_tokens": "int"}
_STOP = {"stop": "end_turn", "length": "max_tokens"}


async def messages(sim: Sim, ex: Exchange) -> None:
    """POST /v1/messages: text, or a ``tool_use`` block when tools are offered."""
    body = decode_body(ex.raw, "MessagesRequest", "anthropic")
    check_types(body, "MessagesRequest", _TYPES)
    tools.check_declared(body.get("tools"), "MessagesRequest", "anthropic.Tool")
    _validate(body)
    raw_name, key, model = lookup(sim, ex, body)
    tools.check_capability(model, body.get("tools"))
    options = token_ceiling(body["max_tokens"], sim.config.tokens)
    n, reason = num_predict(options, sim.config.tokens)
    planned = None
    if body.get("tools"):
        answered = _answers_tool(body["messages"][-1])
        planned = tools.plan(_function(body["tools"]), answered, n, reason, sim.config.tokens)
    tokens = chat_tokens(_chat(body.get("system"), body["messages"]))
    stream = body.get("stream") is True
    reply = _Reply(ex, raw_name, _estimate_tokens(body) if stream else 0, stream)
    async with Job(sim, ex, key, model, None, options) as job:
        await job.prompt(tokens)
        call = None
        if planned is not None:
            call, n, reason = planned
            fault = await job.tokens(n, None)
        else:
            fault = await job.tokens(n, reply.delta if reply.stream else None)
        if fault is not None:
            await end_by_fault(ex, fault, b"")
            return
        await reply.finish(call, "" if call else text_of(n), reason, len(tokens), n)


# The request ---------------------------------------------------------------------------------


def _validate(body: dict[str, Any]) -> None:
    """The checks Ollama's middleware makes before its chat sees the request, in its order."""
    if not body.get("model"):
        raise HTTPError(400, "model is required")
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] <= 0:
        raise HTTPError(400, "max_tokens is required and must be positive")
    if not body.get("messages"):
        raise HTTPError(400, "messages is required")


def _chat(system: Any, messages: list[Any]) -> list[dict[str, str]]:
    """The native chat messages the request becomes (for the prompt's tokens)."""
    out = [{"role": "system", "content": message_text(system)}] if system else []
    for m in messages:
        if isinstance(m, dict):
            out.append(
                {"role": str(m.get("role") or ""), "content": message_text(m.get("content"))}
            )
    return out


def _answers_tool(message: Any) -> bool:
    """Whether a message carries a ``tool_result`` block (the answer to a tool call)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return False
    return any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def _function(offered: list[Any]) -> tuple[str, Any] | None:
    """The first tool the model can call: its name and ``input_schema``. The built-in web
    search is skipped: Ollama runs it on the server, which the simulator does not."""
    for tool in offered:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and not (isinstance(kind, str) and kind.startswith("web_search")):
            return str(tool.get("name") or ""), tool.get("input_schema")
    return None


def _length(value: Any) -> int:
    """Bytes of a string, or of a value's JSON."""
    if isinstance(value, str):
        return len(value.encode())
    return len(dumps(value)) if value is not None else 0


def _block_length(block: Any) -> int:
    """What Ollama's estimate counts of a content block: its text and thinking, and the whole
    JSON of a tool use or tool result."""
    if not isinstance(block, dict):
        return 0
    total = _length(block.get("text")) + _length(block.get("thinking"))
    if block.get("type") in ("tool_use", "tool_result"):
        total += _length(block)
    return total


def _content_length(content: Any) -> int:
    """What Ollama's estimate counts of a system prompt or a message's content."""
    if isinstance(content, str):
        return _length(content)
    if isinstance(content, list):
        return sum(_block_length(b) for b in content)
    return _length(content)


def _estimate_tokens(body: dict[str, Any]) -> int:
    """Ollama's input token estimate (``EstimateInputTokens``): a quarter of the request's
    text length, at least 1."""
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    total = _content_length(body.get("system"))
    for m in messages:
        total += _length(str(m.get("role") or "")) + _content_length(m.get("content"))
    offered = body.get("tools")
    for tool in offered if isinstance(offered, list) else ():
        if isinstance(tool, dict):
            total += sum(_length(tool.get(k)) for k in ("name", "description", "input_schema"))
    return max(1, total // 4)


# The response ---------------------------------------------------------------------------------


def _event(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event."""
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _tool_use(call: tools.ToolCall, arguments: dict[str, Any]) -> dict[str, Any]:
    """A ``tool_use`` content block."""
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}


class _Reply:
    """The answer to one Messages request, complete or streamed (event by event)."""

    __slots__ = ("estimate", "ex", "mid", "model", "started", "stream")

    def __init__(self, ex: Exchange, model: str, estimate: int, stream: bool) -> None:
        self.ex = ex
        self.model = model
        self.estimate = estimate
        self.stream = stream
        self.mid = random_id("msg")
        self.started = False

    def message(self, content: list[Any] | None, stop: str, prompt: int, n: int) -> dict[str, Any]:
        """The message object (``content`` null when empty, as Go writes a nil slice)."""
        message: dict[str, Any] = {
            "id": self.mid,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
        }
        if stop:
            message["stop_reason"] = stop
        message["usage"] = {"input_tokens": prompt, "output_tokens": n}
        return message

    def start(self, prompt: int) -> bytes:
        """``message_start``, with the first chunk."""
        self.started = True
        data = {"type": "message_start", "message": self.message([], "", prompt, 0)}
        return _event("message_start", data)

    async def delta(self, i: int) -> None:
        """Stream token ``i`` (the first starts the message and its text block)."""
        head = b""
        if i == 0:
            block = {"type": "text", "text": ""}
            head = self.start(self.estimate) + _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
        await self.ex.emit(
            head
            + (
                'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                f'"delta":{{"type":"text_delta","text":{token_json(i)}}}}}\n\n'
            ).encode(),
            SSE_TYPE,
        )

    async def finish(
        self, call: tools.ToolCall | None, text: str, reason: str, prompt: int, n: int
    ) -> None:
        """The answer: a ``tool_use`` block, or ``text`` (already streamed when streaming)."""
        stop = "tool_use" if call is not None else _STOP[reason]
        if not self.stream:
            content = [{"type": "text", "text": text}] if text else []
            if call is not None:
                content.append(_tool_use(call, call.arguments))
            await self.ex.json(self.message(content or None, stop, prompt, n))
            return
        events = b""
        if call is not None:
            events = self.start(self.estimate) + _tool_use_events(call)
        elif self.started:
            events = _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        else:  # nothing streamed: the final chunk is the first, with the real count
            events = self.start(prompt)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop},
            "usage": {"input_tokens": prompt, "output_tokens": n},
        }
        events += _event("message_delta", delta)
        events += _event("message_stop", {"type": "message_stop"})
        await self.ex.end(events, SSE_TYPE)


def _tool_use_events(call: tools.ToolCall) -> bytes:
    """A ``tool_use`` block: started with empty input, its input in one JSON delta, stopped."""
    start = {"type": "content_block_start", "index": 0, "content_block": _tool_use(call, {})}
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "input_json_delta", "partial_json": call.arguments_json},
    }
    return (
        _event("content_block_start", start)
        + _event("content_block_delta", delta)
        + _event("content_block_stop", {"type": "content_block_stop", "index": 0})
    )
