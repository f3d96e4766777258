"""Ollama's native inference routes: /api/generate, /api/chat, /api/embed, /api/embeddings."""

from __future__ import annotations

from typing import Any

from corral.sim import tools
from corral.sim.core import Job, Sim, end_by_fault, num_predict
from corral.sim.names import parse_name
from corral.sim.text import (
    chat_tokens,
    count_words,
    embedding,
    generate_tokens,
    text_of,
    token_json,
    truncate_dims,
)
from corral.sim.wire import (
    NDJSON_TYPE,
    Exchange,
    HTTPError,
    check_types,
    decode_body,
    dumps,
    jstr,
    parse_keep_alive,
    utc_now,
)

_COMMON = {
    "model": "string",
    "stream": "bool",
    "format": "any",
    "options": "object",
    "truncate": "bool",
    "shift": "bool",
    "logprobs": "bool",
    "top_logprobs": "int",
}
_GENERATE = {
    **_COMMON,
    "prompt": "string",
    "suffix": "string",
    "system": "string",
    "template": "string",
    "context": "array",
    "raw": "bool",
    "images": "array",
}
_CHAT = {**_COMMON, "messages": "array", "tools": "array"}
_THINK_LEVELS = ("high", "medium", "low", "max")
_ERROR_LINE = dumps({"error": "an error was encountered while running the model"}) + b"\n"


def _types(spec: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in spec.items() if v != "any"}


def _full_name(raw: str) -> str:
    name = parse_name(raw)
    return name.full if name else raw


def _validate_common(body: dict[str, Any], raw: str, caps: tuple[str, ...]) -> None:
    """Checks generate and chat share: top_logprobs, think, format."""
    top = body.get("top_logprobs")
    if isinstance(top, int) and not 0 <= top <= 20:
        raise HTTPError(400, "top_logprobs must be between 0 and 20")
    think = body.get("think")
    if think is not None:
        if not isinstance(think, bool) and think not in _THINK_LEVELS:
            raise HTTPError(
                400,
                f"invalid think value: {dumps(think).decode()} (must be "
                '"high", "medium", "low", "max", true, or false)',
            )
        if think is not False and "thinking" not in caps:
            raise HTTPError(400, f'"{raw}" does not support thinking')
    fmt = body.get("format")
    if fmt is not None and fmt not in ("", "json") and not isinstance(fmt, dict):
        raise HTTPError(
            500,
            f'invalid format: {dumps(fmt).decode()}; expected "json" or a valid JSON Schema object',
        )


_INT_OPTIONS = frozenset(
    (
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
    )
)


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """The request's Modelfile options; an integer option of another type fails the way
    Ollama's option parsing does (unknown keys and null values are ignored)."""
    options = body.get("options")
    if not isinstance(options, dict):
        return {}
    # A null value is skipped, as Ollama's Options.FromMap does (LangChain sends nulls).
    options = {k: v for k, v in options.items() if v is not None}
    for key, value in options.items():
        if key in _INT_OPTIONS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise HTTPError(500, f'option "{key}" must be of type integer')
    return options


async def generate(sim: Sim, ex: Exchange) -> None:
    """POST /api/generate."""
    body = decode_body(ex.raw, "GenerateRequest")
    check_types(body, "GenerateRequest", _types(_GENERATE))
    raw_name: str = body.get("model") or ""
    ex.record.model = raw_name
    found = sim.find(raw_name)
    if found is None:
        raise HTTPError(404, f"model '{raw_name}' not found")
    key, model = found
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    raw = bool(body.get("raw"))
    if raw and (body.get("template") or body.get("system") or body.get("context")):
        raise HTTPError(400, "raw mode does not support template, system, or context")
    if "completion" not in model.capabilities:
        raise HTTPError(400, f'"{raw_name}" does not support generate')
    if body.get("suffix") and "insert" not in model.capabilities:
        raise HTTPError(400, f"{_full_name(model.name)} does not support insert")
    _validate_common(body, raw_name, model.capabilities)
    options = _options(body)
    prompt: str = body.get("prompt") or ""
    if not prompt and not body.get("images"):
        await _load_or_unload(sim, ex, key, model, keep_alive, options, {"response": ""})
        return
    stream = body.get("stream") is not False
    n, reason = num_predict(options, sim.config.tokens)
    context = body.get("context") or []
    tokens = generate_tokens(prompt, raw, body.get("system") or "", context)
    prompt_count = len(tokens)
    m = jstr(raw_name)

    async def line(i: int) -> None:
        await ex.emit(
            f'{{"model":{m},"created_at":"{utc_now()}","response":{token_json(i)},'
            f'"done":false}}\n'.encode(),
            NDJSON_TYPE,
        )

    async with Job(sim, ex, key, model, keep_alive, options) as job:
        await job.prompt(tokens)
        fault = await job.tokens(n, line if stream else None)
        if fault is not None:
            await end_by_fault(ex, fault, _ERROR_LINE)
            return
        final: dict[str, Any] = {
            "model": raw_name,
            "created_at": utc_now(),
            "response": "" if stream else text_of(n),
            "done": True,
            "done_reason": reason,
        }
        if not raw:
            final["context"] = list(range(1, prompt_count + n + 1))
        final.update(job.metrics(prompt_count))
        if stream:
            await ex.end(dumps(final) + b"\n")
        else:
            await ex.json(final)


async def chat(sim: Sim, ex: Exchange) -> None:
    """POST /api/chat."""
    body = decode_body(ex.raw, "ChatRequest")
    check_types(body, "ChatRequest", _types(_CHAT))
    raw_name: str = body.get("model") or ""
    ex.record.model = raw_name
    if not raw_name:
        raise HTTPError(400, "model is required")
    found = sim.find(raw_name)
    if found is None:
        raise HTTPError(404, f"model '{raw_name}' not found")
    key, model = found
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    if "completion" not in model.capabilities:
        raise HTTPError(400, f'"{raw_name}" does not support chat')
    tools.check_capability(model, body.get("tools"))
    _validate_common(body, raw_name, model.capabilities)
    options = _options(body)
    messages: list[Any] = body.get("messages") or []
    if not messages:
        await _load_or_unload(
            sim,
            ex,
            key,
            model,
            keep_alive,
            options,
            {"message": {"role": "assistant", "content": ""}},
        )
        return
    stream = body.get("stream") is not False
    n, reason = num_predict(options, sim.config.tokens)
    tokens = chat_tokens(messages)
    prompt_count = len(tokens)
    planned = None
    if body.get("tools"):
        planned = tools.chat_plan(body["tools"], messages, n, reason, sim.config.tokens)
    m = jstr(raw_name)

    async def line(i: int) -> None:
        await ex.emit(
            f'{{"model":{m},"created_at":"{utc_now()}","message":{{"role":'
            f'"assistant","content":{token_json(i)}}},"done":false}}\n'.encode(),
            NDJSON_TYPE,
        )

    async with Job(sim, ex, key, model, keep_alive, options) as job:
        await job.prompt(tokens)
        if planned is not None:
            await _answer_tool_call(ex, job, stream, prompt_count, *planned)
            return
        fault = await job.tokens(n, line if stream else None)
        if fault is not None:
            await end_by_fault(ex, fault, _ERROR_LINE)
            return
        final: dict[str, Any] = {
            "model": raw_name,
            "created_at": utc_now(),
            "message": {"role": "assistant", "content": "" if stream else text_of(n)},
            "done": True,
            "done_reason": reason,
        }
        final.update(job.metrics(prompt_count))
        if stream:
            await ex.end(dumps(final) + b"\n")
        else:
            await ex.json(final)


def _native_tool_call(call: tools.ToolCall) -> dict[str, Any]:
    """A tool call as /api/chat sends it in ``message.tool_calls``."""
    return {"id": call.id, "function": {"index": 0, "name": call.name, "arguments": call.arguments}}


async def _answer_tool_call(
    ex: Exchange,
    job: Job,
    stream: bool,
    prompt_count: int,
    call: tools.ToolCall,
    n: int,
    reason: str,
) -> None:
    """/api/chat answering with a tool call. Ollama's tool parser holds back the call's text
    until it parses whole, so a stream gets one chunk with the call once all ``n`` tokens are
    out, then the final chunk with empty content; a fault before then is a plain error."""
    fault = await job.tokens(n, None)
    if fault is not None:
        await end_by_fault(ex, fault, _ERROR_LINE)
        return
    raw_name = ex.record.model or ""
    message = {"role": "assistant", "content": "", "tool_calls": [_native_tool_call(call)]}
    if stream:
        chunk = {"model": raw_name, "created_at": utc_now(), "message": message, "done": False}
        await ex.emit(dumps(chunk) + b"\n", NDJSON_TYPE)
        message = {"role": "assistant", "content": ""}
    final: dict[str, Any] = {
        "model": raw_name,
        "created_at": utc_now(),
        "message": message,
        "done": True,
        "done_reason": reason,
    }
    final.update(job.metrics(prompt_count))
    if stream:
        await ex.end(dumps(final) + b"\n")
    else:
        await ex.json(final)


async def _load_or_unload(
    sim: Sim,
    ex: Exchange,
    key: str,
    model: Any,
    keep_alive: float | None,
    options: dict[str, Any],
    payload: dict[str, Any],
) -> None:
    """Empty prompt / messages: load the model (``done_reason: load``) or, with keep_alive 0,
    unload it at once (``unload``). Always one JSON object, even when streaming."""
    raw_name = ex.record.model or ""
    if keep_alive == 0:
        sim.scheduler.expire(key)
        reason = "unload"
    else:
        async with Job(sim, ex, key, model, keep_alive, options, slot=False):
            pass
        reason = "load"
    await ex.json(
        {"model": raw_name, "created_at": utc_now(), **payload, "done": True, "done_reason": reason}
    )


async def embed(sim: Sim, ex: Exchange) -> None:
    """POST /api/embed: L2-normalised vectors, one per input."""
    body = decode_body(ex.raw, "EmbedRequest")
    check_types(
        body,
        "EmbedRequest",
        {"model": "string", "truncate": "bool", "dimensions": "int", "options": "object"},
    )
    raw_name: str = body.get("model") or ""
    ex.record.model = raw_name
    found = sim.find(raw_name)
    if found is None:
        raise HTTPError(404, f"model '{raw_name}' not found")
    key, model = found
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    value = body.get("input")
    if value is None or value == "":
        inputs: list[str] = []
    elif isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        inputs = value
    else:
        raise HTTPError(400, "invalid input type")
    count = sum(count_words(t) for t in inputs)
    if body.get("truncate") is False and any(count_words(t) > model.context_length for t in inputs):
        raise HTTPError(400, "the input length exceeds the context length")
    dims = body.get("dimensions") or 0
    async with Job(sim, ex, key, model, keep_alive, _options(body), slot=bool(inputs)) as job:
        if inputs:
            await job.prompt(count=count)
        vectors: list[Any] = []
        for text in inputs:
            vec = embedding(model.name, text, model.embedding_length)
            vectors.append(truncate_dims(vec, dims) if 0 < dims < len(vec) else vec)
        result: dict[str, Any] = {"model": raw_name, "embeddings": vectors}
        metrics = job.metrics(count)
        result.update(
            (k, metrics[k])
            for k in ("total_duration", "load_duration", "prompt_eval_count")
            if k in metrics
        )
    await ex.json(result)


async def embeddings(sim: Sim, ex: Exchange) -> None:
    """POST /api/embeddings (legacy): one raw float64 vector."""
    body = decode_body(ex.raw, "EmbeddingRequest")
    check_types(
        body, "EmbeddingRequest", {"model": "string", "prompt": "string", "options": "object"}
    )
    raw_name: str = body.get("model") or ""
    ex.record.model = raw_name
    found = sim.find(raw_name)
    if found is None:
        raise HTTPError(404, f'model "{raw_name}" not found, try pulling it first')
    key, model = found
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    prompt: str = body.get("prompt") or ""
    async with Job(sim, ex, key, model, keep_alive, _options(body), slot=bool(prompt)) as job:
        if not prompt:
            vector: Any = []
        else:
            await job.prompt(count=count_words(prompt))
            vector = embedding(model.name, prompt, model.embedding_length, normalize=False)
    await ex.json({"embedding": vector})
