"""OpenAI's Responses API (``POST /v1/responses``, stateless) as Ollama serves it: its chat
behind the translation in Ollama's ``openai/responses.go``, so the simulation is the chat's
(prompt, tokens, timing, faults) in the Responses shapes.

A complete answer is Ollama's full response object (the request's settings echoed, ``usage``
with its token details). A stream is SSE with ``event:`` lines, numbered by
``sequence_number``: ``response.created`` and ``response.in_progress`` with the first chunk,
then the text's item and part events, or a function call's, and ``response.completed``. Its
data are Go maps, so their keys come sorted. A model failure mid-stream just ends the stream:
Ollama's converter has no event for the native error line."""

from __future__ import annotations

import random
import time
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
    dumps_sorted,
    jstr,
)

_TYPES = {
    "model": "string",
    "stream": "bool",
    "instructions": "string",
    "max_output_tokens": "int",
    "background": "bool",
    "temperature": "float64",
    "top_p": "float64",
    "truncation": "string",
}
_GO_KIND = {str: "string", bool: "bool", int: "number", float: "number", list: "array"}
_ITEM_STRUCT = 'struct { Type string "json:\\"type\\""; Role string "json:\\"role\\"" }'
_SKIPPED_ITEMS = ("reasoning", "web_search_call")  # history that adds no chat message


async def responses(sim: Sim, ex: Exchange) -> None:
    """POST /v1/responses: text, a ``function_call`` when tools are offered, or (no input at
    all) the empty answer of a model load, as Ollama's chat gives one."""
    body = decode_body(ex.raw, "ResponsesRequest", "openai")
    check_types(body, "ResponsesRequest", _TYPES)
    tools.check_declared(body.get("tools"), "ResponsesRequest", "openai.ResponsesTool")
    items = body.get("input")
    messages = _messages(body.get("instructions"), items)
    raw_name, key, model = lookup(sim, ex, body)
    tools.check_capability(model, body.get("tools"))
    reply = _Reply(ex, body, raw_name)
    if not messages:
        async with Job(sim, ex, key, model, None, {}, slot=False):
            pass
        await reply.finish(None, "", 0, 0)
        return
    options = token_ceiling(body.get("max_output_tokens"), sim.config.tokens)
    n, reason = num_predict(options, sim.config.tokens)
    planned = None
    if body.get("tools"):
        answered = _answers_call(items)
        planned = tools.plan(_function(body["tools"]), answered, n, reason, sim.config.tokens)
    tokens = chat_tokens(messages)
    async with Job(sim, ex, key, model, None, options) as job:
        await job.prompt(tokens)
        call = None
        if planned is not None:
            call, n, _ = planned
            fault = await job.tokens(n, None)
        else:
            fault = await job.tokens(n, reply.delta if reply.stream else None)
        if fault is not None:
            await end_by_fault(ex, fault, b"")
            return
        await reply.finish(call, "" if call else text_of(n), len(tokens), n)


# The request ---------------------------------------------------------------------------------


def _item_type(item: Any) -> str:
    """An input item's type; a ``role`` without one makes it a message (the shorthand)."""
    if not isinstance(item, dict):
        return ""
    kind = item.get("type")
    if isinstance(kind, str) and kind:
        return kind
    return "message" if item.get("role") else ""


def _answers_call(items: Any) -> bool:
    """Whether the input ends with a function's output (the answer to a call)."""
    last = items[-1] if isinstance(items, list) and items else None
    return _item_type(last) == "function_call_output"


def _messages(instructions: Any, given: Any) -> list[dict[str, str]]:
    """The chat messages the request becomes, failing on input Ollama cannot decode with its
    messages: ``input`` must be a string or a list of typed items."""
    out = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(given, str):
        return [*out, {"role": "user", "content": given}] if given else out
    if given is None:
        return out
    if not isinstance(given, list):
        kind = _GO_KIND.get(type(given), "value")
        raise HTTPError(
            400,
            f"input must be a string or array: json: cannot unmarshal {kind} into Go value "
            "of type []json.RawMessage",
        )
    for i, item in enumerate(given):
        message = _message(i, item)
        if message is not None:
            out.append(message)
    return out


def _message(i: int, item: Any) -> dict[str, str] | None:
    """The chat message of input item ``i`` (None for history that adds none)."""
    kind = _item_type(item)
    if item is not None and not isinstance(item, dict):
        go_kind = _GO_KIND.get(type(item), "value")
        raise HTTPError(
            400,
            f"input[{i}]: json: cannot unmarshal {go_kind} into Go value of type {_ITEM_STRUCT}",
        )
    if not kind or not isinstance(item, dict):
        raise HTTPError(400, f"input[{i}]: input item missing required 'type' field")
    if kind == "message":
        return {"role": str(item.get("role") or ""), "content": message_text(item.get("content"))}
    if kind == "function_call":
        return {"role": "assistant", "content": ""}
    if kind == "function_call_output":
        return {"role": "tool", "content": message_text(item.get("output"))}
    if kind in _SKIPPED_ITEMS:
        return None
    raise HTTPError(400, f"input[{i}]: unknown input item type: {jstr(kind)}")


def _function(offered: list[Any]) -> tuple[str, Any] | None:
    """The first function the tools declare: a ``function`` tool, or the first member of a
    ``namespace`` (named ``namespace.member``, as Ollama flattens it). The built-in web search
    is skipped: Ollama runs it on the server, which the simulator does not."""
    for tool in offered:
        if not isinstance(tool, dict) or tool.get("type") == "web_search":
            continue
        name = str(tool.get("name") or "")
        if tool.get("type") != "namespace":
            return name, tool.get("parameters")
        members = tool.get("tools")
        member = _function(members) if isinstance(members, list) else None
        if member is not None:
            prefix = name + "." if name and not member[0].startswith(name + ".") else ""
            return prefix + member[0], member[1]
    return None


# The response ---------------------------------------------------------------------------------


def _go_float(value: Any, default: float) -> Any:
    """A float64 setting as Go writes it (1.0 as ``1``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        value = default
    return int(value) if float(value).is_integer() else value


def _deep_sorted(value: Any) -> Any:
    """``value`` with every object's keys sorted, as Go writes a decoded map."""
    if isinstance(value, dict):
        return {k: _deep_sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_deep_sorted(v) for v in value]
    return value


def _tool_echo(tool: dict[str, Any], stream: bool) -> dict[str, Any]:
    """A declared tool as the response echoes it."""
    params = tool.get("parameters")
    echo = {
        "type": tool.get("type") if isinstance(tool.get("type"), str) else "",
        "name": tool.get("name") if isinstance(tool.get("name"), str) else "",
        "description": tool.get("description"),
        "strict": tool.get("strict"),
        "parameters": _deep_sorted(params) if isinstance(params, dict) else None,
    }
    members = tool.get("tools")
    if not stream and isinstance(members, list) and members:
        echo["tools"] = [_tool_echo(m, stream) for m in members if isinstance(m, dict)]
    return echo


def _text_format(body: dict[str, Any]) -> dict[str, Any]:
    """The ``text.format`` echoed: the request's, or plain text."""
    text = body.get("text")
    given = text.get("format") if isinstance(text, dict) else None
    if not isinstance(given, dict):
        return {"type": "text"}
    out: dict[str, Any] = {"type": given.get("type") or ""}
    if given.get("name"):
        out["name"] = given["name"]
    for key in ("schema", "strict"):
        if given.get(key) is not None:
            out[key] = given[key]
    return out


def _reasoning(body: dict[str, Any], stream: bool) -> dict[str, Any] | None:
    """The ``reasoning`` echoed when the request sets an effort or a summary (a stream names
    both, null when unset; a complete response only the ones set)."""
    given = body.get("reasoning")
    if not isinstance(given, dict):
        return None
    values = {k: given.get(k) or None for k in ("effort", "summary")}
    if not any(values.values()):
        return None
    return values if stream else {k: v for k, v in values.items() if v}


def _usage(prompt: int, out: int) -> dict[str, Any]:
    """The token usage, details included."""
    return {
        "input_tokens": prompt,
        "output_tokens": out,
        "total_tokens": prompt + out,
        # Ollama leaves both details at zero.
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _message_item(mid: str, status: str, text: str | None) -> dict[str, Any]:
    """The assistant's message item; ``text`` None while it is still empty (``content: []``)."""
    content = [] if text is None else [_part(text)]
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}


def _part(text: str) -> dict[str, Any]:
    """An ``output_text`` content part."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, status: str, call: tools.ToolCall) -> dict[str, Any]:
    """A ``function_call`` output item (its arguments empty while in progress)."""
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments_json if status == "completed" else "",
    }


class _Reply:
    """The answer to one Responses request, complete or streamed (event by event)."""

    __slots__ = ("body", "ex", "mid", "model", "opened", "rid", "seq", "stream")

    def __init__(self, ex: Exchange, body: dict[str, Any], model: str) -> None:
        self.ex = ex
        self.body = body
        self.model = model
        self.stream = body.get("stream") is True
        self.rid = f"resp_{random.randrange(999_999)}"
        self.mid = f"msg_{random.randrange(999_999)}"
        self.seq = 0
        self.opened = False

    def response(
        self, status: str, output: list[Any], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The response object, in the field order of Ollama's ``ResponsesResponse``."""
        body, now = self.body, int(time.time())
        offered, truncation = body.get("tools"), body.get("truncation")
        declared = offered if isinstance(offered, list) else []
        echoed = [_tool_echo(t if isinstance(t, dict) else {}, self.stream) for t in declared]
        return {
            "id": self.rid,
            "object": "response",
            "created_at": now,
            "completed_at": now if status == "completed" else None,
            "status": status,
            "incomplete_details": None,
            "model": self.model,
            "previous_response_id": None,
            "instructions": body.get("instructions") or None,
            "output": output,
            "error": None,
            "tools": echoed,
            "tool_choice": "auto",
            "truncation": truncation if isinstance(truncation, str) else "disabled",
            "parallel_tool_calls": True,
            "text": {"format": _text_format(body)},
            "top_p": _go_float(body.get("top_p"), 1.0),
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": _go_float(body.get("temperature"), 1.0),
            "reasoning": _reasoning(body, self.stream),
            "usage": usage,
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": body.get("background") is True,
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        """One numbered SSE event."""
        data["type"] = name
        data["sequence_number"] = self.seq
        self.seq += 1
        return b"event: " + name.encode() + b"\ndata: " + dumps_sorted(data) + b"\n\n"

    def opening(self) -> bytes:
        """``response.created`` and ``response.in_progress``, sent with the first chunk."""
        self.opened = True
        return self.event(
            "response.created", {"response": self.response("in_progress", [], None)}
        ) + self.event("response.in_progress", {"response": self.response("in_progress", [], None)})

    async def delta(self, i: int) -> None:
        """Stream token ``i`` (the first opens the response, the message item and its part)."""
        head = b""
        if i == 0:
            head = (
                self.opening()
                + self.event(
                    "response.output_item.added",
                    {"output_index": 0, "item": _message_item(self.mid, "in_progress", None)},
                )
                + self.event(
                    "response.content_part.added",
                    {"item_id": self.mid, "output_index": 0, "content_index": 0, "part": _part("")},
                )
            )
        seq, self.seq = self.seq, self.seq + 1
        await self.ex.emit(
            head
            + (
                'event: response.output_text.delta\ndata: {"content_index":0,'
                f'"delta":{token_json(i)},"item_id":"{self.mid}","logprobs":[],'
                f'"output_index":0,"sequence_number":{seq},'
                '"type":"response.output_text.delta"}\n\n'
            ).encode(),
            SSE_TYPE,
        )

    async def finish(self, call: tools.ToolCall | None, text: str, prompt: int, n: int) -> None:
        """The answer: a function call, or ``text`` (already streamed when streaming)."""
        if not self.stream:
            if call is not None:
                output = [_call_item(f"fc_{self.rid}_0", "completed", call)]
            else:
                output = [_message_item(self.mid, "completed", text)]
            await self.ex.json(self.response("completed", output, _usage(prompt, n)))
            return
        events, output = self.closing(call, text)
        done = self.response("completed", output, _usage(prompt, n))
        events += self.event("response.completed", {"response": done})
        await self.ex.end(events, SSE_TYPE)

    def closing(self, call: tools.ToolCall | None, text: str) -> tuple[bytes, list[Any]]:
        """The events that close the output (opening the response first if nothing was
        streamed yet), and the final output."""
        events = b"" if self.opened else self.opening()
        if call is not None:
            item_id = f"fc_{random.randrange(999_999)}_0"
            return events + self.call_events(item_id, call), [
                _call_item(item_id, "completed", call)
            ]
        if not text:
            return events, []
        where = {"item_id": self.mid, "output_index": 0, "content_index": 0}
        item = _message_item(self.mid, "completed", text)
        events += (
            self.event("response.output_text.done", {**where, "text": text, "logprobs": []})
            + self.event("response.content_part.done", {**where, "part": _part(text)})
            + self.event("response.output_item.done", {"output_index": 0, "item": item})
        )
        return events, [item]

    def call_events(self, item_id: str, call: tools.ToolCall) -> bytes:
        """A function call's events: item added, its arguments in one delta, done, item done."""
        where = {"item_id": item_id, "output_index": 0}
        return (
            self.event(
                "response.output_item.added",
                {"output_index": 0, "item": _call_item(item_id, "in_progress", call)},
            )
            + self.event(
                "response.function_call_arguments.delta", {**where, "delta": call.arguments_json}
            )
            + self.event(
                "response.function_call_arguments.done", {**where, "arguments": call.arguments_json}
            )
            + self.event(
                "response.output_item.done",
                {"output_index": 0, "item": _call_item(item_id, "completed", call)},
            )
        )
