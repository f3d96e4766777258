"""The error bodies of the three APIs corral speaks, by route shape: Ollama's ``{"error"}``,
OpenAI's error object (``/v1``), Anthropic's (``/v1/messages``). Shared by the proxy and the
simulator, so both answer the same way."""

from __future__ import annotations

import json
from typing import Any, Literal

Shape = Literal["ollama", "openai", "anthropic"]

_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
# Anthropic's error types by status (its API reference, "Errors").
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_payload(message: str, *, shape: Shape, status: int) -> dict[str, Any]:
    """The error object a client of ``shape`` expects for ``status``."""
    if shape == "openai":
        kind = _OPENAI_TYPES.get(status, "api_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    if shape == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": message}


def error_body(message: str, *, shape: Shape, status: int) -> bytes:
    """:func:`error_payload`, as compact JSON bytes."""
    payload = error_payload(message, shape=shape, status=status)
    return json.dumps(payload, separators=(",", ":")).encode()
