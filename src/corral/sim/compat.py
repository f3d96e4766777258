"""What the translated APIs share (Ollama's chat behind OpenAI's Responses in
:mod:`corral.sim.responses`, Anthropic's Messages in :mod:`corral.sim.messages`), and OpenAI's
audio transcriptions."""

from __future__ import annotations

from typing import Any

from corral.asgi import form_field
from corral.sim.core import Job, Sim, end_by_fault, num_predict
from corral.sim.text import text_of
from corral.sim.v1 import lookup
from corral.sim.wire import Exchange


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def token_ceiling(value: Any, tokens: int) -> dict[str, Any]:
    """A token ceiling: the answer stops at it only when it would be longer (the model's own
    end comes first otherwise), as an LLM's does."""
    if isinstance(value, int) and not isinstance(value, bool) and value < tokens:
        return {"num_predict": value}
    return {}


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
