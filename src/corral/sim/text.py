"""Deterministic "model output": tokens cycle through ``WORDS`` (token 0 is ``WORDS[0]``, token i
is ``" " + WORDS[i % len(WORDS)]``), prompt token counts are word counts plus a fixed template
overhead, and embeddings are seeded by the input text.

For the prompt cache a prompt is also a token sequence: the words of the rendered prompt with
template markers around them, so that a chat follow-up that resends the history and the answer
starts with exactly the tokens of the previous prompt and the words generated after it."""

from __future__ import annotations

import hashlib
import math
import random
from functools import lru_cache
from typing import Any

from corral.sim.wire import jstr

WORDS = (
    "The",
    "sky",
    "is",
    "blue",
    "because",
    "of",
    "Rayleigh",
    "scattering",
    "in",
    "the",
    "upper",
    "atmosphere",
    "which",
    "favours",
    "short",
    "wavelengths.",
)

_FIRST = [jstr(w) for w in WORDS]
_LATER = [jstr(" " + w) for w in WORDS]

TEMPLATE_TOKENS = 10  # what a chat template adds around a prompt
MESSAGE_TOKENS = 4  # per chat message (role header and end-of-turn)


_START, _END, _EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
_REPLY = (_START, "assistant", _END)  # the generation prompt that ends every rendered prompt


def token(i: int) -> str:
    """The text of token ``i``."""
    word = WORDS[i % len(WORDS)]
    return word if i == 0 else " " + word


def token_json(i: int) -> str:
    """Token ``i`` as a JSON string literal (pre-encoded: this is the hot path)."""
    return _FIRST[0] if i == 0 else _LATER[i % len(WORDS)]


def text_of(n: int) -> str:
    """The whole text of ``n`` tokens."""
    return "".join(token(i) for i in range(n))


def count_words(text: str) -> int:
    """Tokens in ``text`` (one per whitespace-separated word)."""
    return len(text.split())


def prompt_tokens(prompt: str, raw: bool = False, system: str = "") -> int:
    """``prompt_eval_count`` of a generate request."""
    return count_words(prompt) + count_words(system) + (0 if raw else TEMPLATE_TOKENS)


def chat_prompt_tokens(messages: list[Any]) -> int:
    """``prompt_eval_count`` of a chat request."""
    total = 3
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        total += MESSAGE_TOKENS + (count_words(content) if isinstance(content, str) else 0)
    return total


def output_tokens(n: int) -> tuple[str, ...]:
    """The first ``n`` generated tokens as prompt tokens (their words)."""
    return tuple(WORDS[i % len(WORDS)] for i in range(n))


def generate_tokens(
    prompt: str, raw: bool = False, system: str = "", context: list[Any] | None = None
) -> tuple[str, ...]:
    """The prompt of a generate request as tokens; as long as ``prompt_tokens`` counts, plus
    one token per ``context`` entry (which comes first)."""
    head = tuple(f"<{c}>" for c in context or ())
    if raw:
        return (*head, *prompt.split())
    return (
        *head,
        _START,
        "system",
        _END,
        *system.split(),
        _EOT,
        _START,
        "user",
        _END,
        *prompt.split(),
        *_REPLY,
    )


def chat_tokens(messages: list[Any]) -> tuple[str, ...]:
    """The rendered chat prompt as tokens (``chat_prompt_tokens`` of them): each message's role
    header, its words and an end-of-turn, then the assistant's header."""
    out: list[str] = []
    for msg in messages:
        role = msg.get("role") if isinstance(msg, dict) else None
        content = msg.get("content") if isinstance(msg, dict) else None
        out += (_START, role if isinstance(role, str) else "", _END)
        if isinstance(content, str):
            out += content.split()
        out.append(_EOT)
    out += _REPLY
    return tuple(out)


def _seed(model: str, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{model}\0{text}".encode(), digest_size=8).digest())


@lru_cache(maxsize=512)
def embedding(model: str, text: str, dims: int, normalize: bool = True) -> tuple[float, ...]:
    """A deterministic vector for ``text``: L2-normalised with float32 precision (as /api/embed
    returns) or raw float64 (as the legacy /api/embeddings returns)."""
    rng = random.Random(_seed(model, text))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    if not normalize:
        return tuple(vec)
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    # Nine significant digits is what a float32 round-trips to, so JSON stays short like Go's.
    return tuple(float(f"{x / norm:.9g}") for x in vec)


def truncate_dims(vec: tuple[float, ...], dims: int) -> list[float]:
    """Keep the first ``dims`` values and re-normalise (the ``dimensions`` option)."""
    cut = vec[:dims]
    norm = math.sqrt(sum(x * x for x in cut)) or 1.0
    return [float(f"{x / norm:.9g}") for x in cut]
