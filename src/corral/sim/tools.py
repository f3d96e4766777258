"""Tool calling. A chat that offers tools is answered with a call of the first one, its
arguments made from the tool's JSON schema, unless the conversation's last turn is a tool
result: then the model answers in text, so an agent loop ends after one round trip.

Each API names its tools its own way (native and OpenAI chat nest them under ``function``,
Responses and Anthropic do not); the routes pick the function and this module builds the call.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from corral.sim.config import SimModel
from corral.sim.names import parse_name
from corral.sim.wire import HTTPError, dumps

_ID_CHARS = string.ascii_lowercase + string.digits
_MAX_DEPTH = 8  # a deeper schema gets an empty object (schemas can nest without end)
_EXAMPLES: dict[str, Any] = {
    "string": "example",
    "integer": 1,
    "number": 1,
    "boolean": True,
    "null": None,
}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model makes: ``id`` as Ollama makes them (``call_`` and 8 random
    characters), the function's name and its arguments."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as the JSON string the OpenAI and Responses shapes carry."""
        return dumps(self.arguments).decode()


def call(name: str, schema: Any) -> ToolCall:
    """A call of function ``name`` with arguments that fit its parameters ``schema``."""
    args = example_arguments(schema)
    return ToolCall("call_" + "".join(random.choices(_ID_CHARS, k=8)), name, args)


def example_arguments(schema: Any, depth: int = 0) -> dict[str, Any]:
    """An object for a JSON schema: every property (in the schema's order) and every required
    name, each with a plausible value; nested objects have sorted keys, as Go writes maps."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return {}
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    args = {str(k): example_value(v, depth + 1) for k, v in props.items()}
    required = schema.get("required")
    if isinstance(required, list):
        for key in required:
            if isinstance(key, str) and key not in args:
                args[key] = "example"
    return args


def example_value(schema: Any, depth: int) -> Any:
    """A plausible value for one property: its first enum value, else one of its type
    (``"example"``, 1, true, a one-item array, an object)."""
    if not isinstance(schema, dict):
        return "example"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the first that is not null
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "array":
        return [example_value(schema.get("items"), depth + 1)] if depth <= _MAX_DEPTH else []
    if kind == "object":
        return dict(sorted(example_arguments(schema, depth).items()))
    return _EXAMPLES.get(kind, "example") if isinstance(kind, str) else "example"


def chat_function(tools: Any) -> tuple[str, Any] | None:
    """The first function of native or OpenAI chat ``tools``
    (``{"type": "function", "function": {"name", "parameters"}}``): its name and schema."""
    first = tools[0] if isinstance(tools, list) and tools else None
    function = first.get("function") if isinstance(first, dict) else None
    if not isinstance(function, dict):
        return None
    return str(function.get("name") or ""), function.get("parameters")


_GO_KIND = {str: "string", bool: "bool", int: "number", float: "number", list: "array"}


def check_declared(offered: Any, struct: str, element: str) -> None:
    """``tools`` must be a list of objects (or null), else the request fails to decode as in
    Go, naming the request's ``struct`` and its tools' ``element`` type."""
    if offered is None:
        return
    if not isinstance(offered, list):
        kind, want = _GO_KIND.get(type(offered), "object"), "[]" + element
    else:
        wrong = [t for t in offered if t is not None and not isinstance(t, dict)]
        if not wrong:
            return
        kind, want = _GO_KIND.get(type(wrong[0]), "value"), element
    raise HTTPError(
        400, f"json: cannot unmarshal {kind} into Go struct field {struct}.tools of type {want}"
    )


def check_capability(model: SimModel, offered: Any) -> None:
    """Refuse tools offered to a model without the capability, as Ollama's chat does on every
    route (the message names the model fully qualified)."""
    if offered and "tools" not in model.capabilities:
        name = parse_name(model.name)
        raise HTTPError(400, f"{name.full if name else model.name} does not support tools")


def chat_plan(
    offered: Any, messages: list[Any], n: int, reason: str, tokens: int
) -> tuple[ToolCall, int, str] | None:
    """:func:`plan` for a native or OpenAI chat offering ``offered`` tools."""
    return plan(chat_function(offered), last_is_tool_result(messages), n, reason, tokens)


def last_is_tool_result(messages: list[Any]) -> bool:
    """Whether a native or OpenAI chat ends with a tool's answer (role ``tool``)."""
    last = messages[-1] if messages else None
    return isinstance(last, dict) and str(last.get("role") or "").lower() == "tool"


def plan(
    function: tuple[str, Any] | None, answered: bool, n: int, reason: str, tokens: int
) -> tuple[ToolCall, int, str] | None:
    """The call a request offering ``function`` gets, the tokens it is written in (the
    configured answer length) and its done reason. None, for a text answer, when there is no
    function, when the last turn was a tool's result (``answered``), or when a token ceiling
    below the call's length cuts it short (the truncated text is the answer then)."""
    if function is None or answered or n < tokens:
        return None
    return call(*function), tokens, "stop"
