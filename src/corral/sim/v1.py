"""The OpenAI-compatible routes under /v1, in Ollama v0.32.6+'s wire format (SSE when
streaming; errors in OpenAI's shape; a mid-stream failure ends without ``data: [DONE]``)."""

from __future__ import annotations

import base64
import random
import struct
import time
from typing import Any

from corral.sim import tools
from corral.sim.config import SimModel
from corral.sim.core import Job, Sim, end_by_fault, num_predict
from corral.sim.names import owner_of, short_name
from corral.sim.text import (
    chat_tokens,
    count_words,
    embedding,
    generate_tokens,
    text_of,
    token_json,
    truncate_dims,
)
from corral.sim.wire import SSE_TYPE, Exchange, HTTPError, check_types, decode_body, dumps, jstr

DONE = b"data: [DONE]\n\n"
FP = '"system_fingerprint":"fp_ollama"'


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """The native options a /v1 body maps to (only what changes the simulation)."""
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        return {"num_predict": max_tokens}
    return {}


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def lookup(sim: Sim, ex: Exchange, body: dict[str, Any]) -> tuple[str, str, SimModel]:
    """The model a /v1 request names (raw name, store key, model), refused as Ollama's chat
    refuses it: no name, unknown, or no chat."""
    raw_name: str = body.get("model") or ""
    ex.record.model = raw_name
    if not raw_name:
        raise HTTPError(400, "model is required")
    found = sim.find(raw_name)
    if found is None:
        raise HTTPError(404, f"model '{raw_name}' not found")
    if "completion" not in found[1].capabilities:
        raise HTTPError(400, f'"{raw_name}" does not support chat')
    return raw_name, found[0], found[1]


def _openai_tool_call(call: tools.ToolCall) -> dict[str, Any]:
    """A tool call in OpenAI's shape, as Ollama writes it (arguments as a JSON string)."""
    function = {"name": call.name, "arguments": call.arguments_json}
    return {"id": call.id, "index": 0, "type": "function", "function": function}


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


async def chat_completions(sim: Sim, ex: Exchange) -> None:
    """POST /v1/chat/completions."""
    body = decode_body(ex.raw, "ChatCompletionRequest")
    check_types(
        body,
        "ChatCompletionRequest",
        {"model": "string", "messages": "array", "stream": "bool", "max_tokens": "int"},
    )
    tools.check_declared(body.get("tools"), "ChatCompletionRequest", "api.Tool")
    if not body.get("messages"):
        raise HTTPError(400, "[] is too short - 'messages'")
    raw_name, key, model = lookup(sim, ex, body)
    tools.check_capability(model, body.get("tools"))
    options = _options(body)
    n, reason = num_predict(options, sim.config.tokens)
    planned = None
    if body.get("tools"):
        planned = tools.chat_plan(body["tools"], body["messages"], n, reason, sim.config.tokens)
    tokens = chat_tokens(body["messages"])
    prompt_count = len(tokens)
    created = int(time.time())
    cid = f"chatcmpl-{random.randint(0, 998)}"
    head = (
        f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
        f'"model":{jstr(raw_name)},{FP},"choices":['
    )

    async def event(i: int) -> None:
        delta = ('{"role":"assistant","content":' if i == 0 else '{"content":') + token_json(i)
        await ex.emit(
            f'{head}{{"index":0,"delta":{delta}}},"finish_reason":null}}]}}\n\n'.encode(), SSE_TYPE
        )

    stream = body.get("stream") is True
    async with Job(sim, ex, key, model, None, options) as job:
        await job.prompt(tokens)
        if planned is not None:
            # The call's text is held back until it parses whole (see native._answer_tool_call).
            _, n, reason = planned
            fault = await job.tokens(n, None)
        else:
            fault = await job.tokens(n, event if stream else None)
        if fault is not None:
            # Ollama's writer turns the native error line into one empty delta, then stops.
            err = f'{head}{{"index":0,"delta":{{"content":""}},"finish_reason":null}}]}}\n\n'
            await end_by_fault(ex, fault, err.encode())
            return
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        if planned is not None:
            message["tool_calls"] = [_openai_tool_call(planned[0])]
            reason = "tool_calls"  # Ollama's name for a "stop" that made a call
        if not stream:
            if planned is None:
                message["content"] = text_of(n)
            await ex.json(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": raw_name,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"index": 0, "message": message, "finish_reason": reason}],
                    "usage": _usage(prompt_count, n, job.cached),
                }
            )
            return
        if n == 0 or planned is not None:
            delta = dumps(message).decode()
            await ex.emit(
                f'{head}{{"index":0,"delta":{delta},"finish_reason":null}}]}}\n\n'.encode(),
                SSE_TYPE,
            )
        tail = f'{head}{{"index":0,"delta":{{}},"finish_reason":"{reason}"}}]}}\n\n'
        if _include_usage(body):
            usage = _usage(prompt_count, n, job.cached)
            tail += f'{head}],"usage":{dumps(usage).decode()}}}\n\n'
        await ex.end(tail.encode() + DONE, SSE_TYPE)


async def completions(sim: Sim, ex: Exchange) -> None:
    """POST /v1/completions."""
    body = decode_body(ex.raw, "CompletionRequest")
    check_types(
        body,
        "CompletionRequest",
        {"model": "string", "prompt": "string", "stream": "bool", "max_tokens": "int"},
    )
    raw_name, key, model = lookup(sim, ex, body)
    options = _options(body)
    n, reason = num_predict(options, sim.config.tokens)
    tokens = generate_tokens(body.get("prompt") or "")
    prompt_count = len(tokens)
    created = int(time.time())
    cid = f"cmpl-{random.randint(0, 998)}"
    usage = _include_usage(body)
    head = f'data: {{"id":"{cid}","object":"text_completion","created":{created},"choices":['
    tail = f'],"model":{jstr(raw_name)},{FP}'
    if usage:
        tail += ',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
    tail += "}\n\n"

    async def event(i: int) -> None:
        await ex.emit(
            f'{head}{{"text":{token_json(i)},"index":0,"finish_reason":null}}{tail}'.encode(),
            SSE_TYPE,
        )

    stream = body.get("stream") is True
    async with Job(sim, ex, key, model, None, options) as job:
        await job.prompt(tokens)
        fault = await job.tokens(n, event if stream else None)
        if fault is not None:
            err = f'{head}{{"text":"","index":0,"finish_reason":null}}{tail}'
            await end_by_fault(ex, fault, err.encode())
            return
        if not stream:
            await ex.json(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": raw_name,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"text": text_of(n), "index": 0, "finish_reason": reason}],
                    "usage": _usage(prompt_count, n),
                }
            )
            return
        last = f'{head}{{"text":"","index":0,"finish_reason":"{reason}"}}{tail}'
        if usage:
            last += (
                f'{head}],"model":{jstr(raw_name)},{FP},'
                f'"usage":{dumps(_usage(prompt_count, n)).decode()}}}\n\n'
            )
        await ex.end(last.encode() + DONE, SSE_TYPE)


async def v1_embeddings(sim: Sim, ex: Exchange) -> None:
    """POST /v1/embeddings (float lists, or base64 little-endian float32)."""
    body = decode_body(ex.raw, "EmbedRequest")
    check_types(body, "EmbedRequest", {"model": "string", "dimensions": "int"})
    value = body.get("input")
    if value == "":
        value = [""]
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = value
    else:
        raise HTTPError(400, "invalid input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise HTTPError(
            400,
            f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].",
        )
    raw_name: str = body.get("model") or ""
    ex.record.model = raw_name
    found = sim.find(raw_name)
    if found is None:
        raise HTTPError(404, f"model '{raw_name}' not found")
    key, model = found
    dims = body.get("dimensions") or 0
    data = []
    tokens = sum(count_words(t) for t in inputs)
    async with Job(sim, ex, key, model, None, {}) as job:
        await job.prompt(count=tokens)
        for i, text in enumerate(inputs):
            vec: Any = embedding(model.name, text, model.embedding_length)
            if 0 < dims < len(vec):
                vec = truncate_dims(vec, dims)
            if fmt == "base64":
                vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": vec, "index": i})
    await ex.json(
        {
            "object": "list",
            "data": data,
            "model": raw_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _model_entry(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": owner_of(name)}


async def list_models(sim: Sim, ex: Exchange) -> None:
    """GET /v1/models (``data`` is null when there are no models: Ollama's quirk)."""
    models = sorted(sim.config.models, key=lambda m: m.modified_at, reverse=True)
    data = [_model_entry(m.name, m.modified_at) for m in models] or None
    await ex.json({"object": "list", "data": data})


async def retrieve_model(sim: Sim, ex: Exchange) -> None:
    """GET /v1/models/{model}; ``id`` echoes the path."""
    ex.record.model = ex.param
    found = sim.find(ex.param)
    if found is None:
        raise HTTPError(404, f"model '{short_name(ex.param)}' not found")
    entry = _model_entry(ex.param, found[1].modified_at)
    entry["owned_by"] = owner_of(found[1].name)
    await ex.json(entry)
