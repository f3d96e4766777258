"""The Responses (/v1/responses) and Anthropic Messages (/v1/messages) routes in Ollama's own
shapes, field by field, in-process through httpx.ASGITransport."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from corral.sim import SimConfig, create_sim_app
from corral.sim.app import SimApp
from corral.sim.text import text_of

USER = [{"role": "user", "content": "hi"}]
# Ollama's ResponsesResponse, in its field order.
RESPONSE_FIELDS = [
    "id", "object", "created_at", "completed_at", "status", "incomplete_details", "model",
    "previous_response_id", "instructions", "output", "error", "tools", "tool_choice",
    "truncation", "parallel_tool_calls", "text", "top_p", "presence_penalty",
    "frequency_penalty", "top_logprobs", "temperature", "reasoning", "usage",
    "max_output_tokens", "max_tool_calls", "store", "background", "service_tier", "metadata",
    "safety_identifier", "prompt_cache_key",
]  # fmt: skip


@pytest.fixture
def app() -> SimApp:
    return create_sim_app(SimConfig(tokens=4))


def sse(resp: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of an SSE body whose events are named."""
    out = []
    for block in resp.text.split("\n\n"):
        if block:
            name, data = block.split("\n")
            assert name.startswith("event: ")
            assert data.startswith("data: ")
            out.append((name[7:], json.loads(data[6:])))
    return out


async def test_responses_complete_shape(client: httpx.AsyncClient) -> None:
    """Ollama's whole response object: the request's settings echoed, usage details at zero,
    ``incomplete_details`` null and status completed even when the ceiling cut the text."""
    body = {
        "model": "llama3.2",
        "input": "why?",
        "instructions": "Be terse.",
        "max_output_tokens": 2,
        "temperature": 0.5,
    }
    r = await client.post("/v1/responses", json=body)
    done = r.json()
    assert list(done) == RESPONSE_FIELDS
    assert re.fullmatch(r"resp_\d+", done["id"])
    assert done["status"] == "completed"
    assert done["incomplete_details"] is None
    assert done["completed_at"] >= done["created_at"]
    assert (done["instructions"], done["max_output_tokens"]) == ("Be terse.", 2)
    assert (done["temperature"], done["top_p"], done["truncation"]) == (0.5, 1, "disabled")
    assert (done["tools"], done["tool_choice"], done["metadata"]) == ([], "auto", {})
    assert done["text"] == {"format": {"type": "text"}}
    [item] = done["output"]
    assert list(item) == ["id", "type", "status", "role", "content"]
    assert re.fullmatch(r"msg_\d+", item["id"])
    assert item["content"] == [
        {"type": "output_text", "text": text_of(2), "annotations": [], "logprobs": []}
    ]
    assert done["usage"] == {
        "input_tokens": done["usage"]["input_tokens"],
        "output_tokens": 2,
        "total_tokens": done["usage"]["input_tokens"] + 2,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


async def test_responses_stream_events(client: httpx.AsyncClient) -> None:
    """The text stream's events in Ollama's order, numbered from 0, each ``event:`` line
    naming its data's type, data keys sorted as Go writes maps."""
    r = await client.post("/v1/responses", json={"model": "llama3.2", "input": "x", "stream": True})
    events = sse(r)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert all(d["type"] == name and list(d) == sorted(d) for name, d in events)
    delta = events[4][1]
    assert (delta["delta"], delta["logprobs"]) == ("The", [])
    assert events[0][1]["response"]["status"] == "in_progress"
    assert events[0][1]["response"]["usage"] is None
    final = events[-1][1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == text_of(4)
    assert final["usage"]["output_tokens"] == 4


async def test_responses_without_input_loads_the_model(client: httpx.AsyncClient) -> None:
    """No input is a chat without messages: Ollama loads the model and answers empty."""
    done = (await client.post("/v1/responses", json={"model": "llama3.2"})).json()
    assert done["output"][0]["content"][0]["text"] == ""
    assert done["usage"]["total_tokens"] == 0
    r = await client.post("/v1/responses", json={"model": "llama3.2", "stream": True})
    events = sse(r)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.completed",
    ]
    assert events[-1][1]["response"]["output"] == []


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([{"content": "x"}], "input[0]: input item missing required 'type' field"),
        ([{"type": "nope"}], 'input[0]: unknown input item type: "nope"'),
        (
            5,
            "input must be a string or array: json: cannot unmarshal number into Go value of "
            "type []json.RawMessage",
        ),
    ],
)
async def test_responses_input_errors(client: httpx.AsyncClient, given: Any, message: str) -> None:
    """Input Ollama cannot decode is a 400 in OpenAI's shape, with its decoder's words."""
    r = await client.post("/v1/responses", json={"model": "llama3.2", "input": given})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == message


async def test_messages_complete_shape(client: httpx.AsyncClient) -> None:
    """Ollama's message: a 24-hex-digit id, no ``stop_sequence`` (omitted when empty)."""
    body = {"model": "llama3.2", "max_tokens": 64, "messages": USER}
    message = (await client.post("/v1/messages", json=body)).json()
    assert re.fullmatch(r"msg_[0-9a-f]{24}", message["id"])
    assert message == {
        "id": message["id"],
        "type": "message",
        "role": "assistant",
        "model": "llama3.2",
        "content": [{"type": "text", "text": text_of(4)}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 4},
    }
    cut = (await client.post("/v1/messages", json={**body, "max_tokens": 2})).json()
    assert cut["stop_reason"] == "max_tokens"


async def test_messages_stream_events(client: httpx.AsyncClient) -> None:
    """The stream: message_start (estimated input tokens, no stop fields), one text block,
    message_delta with the stop reason and both counts, message_stop."""
    body = {"model": "llama3.2", "max_tokens": 64, "messages": USER, "stream": True}
    events = sse(await client.post("/v1/messages", json=body))
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(d["type"] == name for name, d in events)
    start = events[0][1]["message"]
    assert list(start) == ["id", "type", "role", "model", "content", "usage"]
    assert start["usage"] == {"input_tokens": 1, "output_tokens": 0}  # len("user"+"hi") // 4
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "The"}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn"}
    assert delta["usage"]["output_tokens"] == 4
    assert delta["usage"]["input_tokens"] > 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 8, "messages": USER}, "model is required"),
        ({"model": "llama3.2", "messages": USER}, "max_tokens is required and must be positive"),
        ({"model": "llama3.2", "max_tokens": 8}, "messages is required"),
    ],
)
async def test_messages_request_errors(
    client: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    """The middleware's checks, in Anthropic's error shape with a request id."""
    r = await client.post("/v1/messages", json=body)
    assert r.status_code == 400
    error = r.json()
    assert error["error"] == {"type": "invalid_request_error", "message": message}
    assert re.fullmatch(r"req_[0-9a-f]{24}", error["request_id"])


async def test_empty_body_is_eof(client: httpx.AsyncClient) -> None:
    """An empty body fails in the middlewares' JSON decoder: ``EOF``."""
    r = await client.post("/v1/messages", content=b"")
    assert (r.status_code, r.json()["error"]["message"]) == (400, "EOF")
    r = await client.post("/v1/responses", content=b"")
    assert (r.status_code, r.json()["error"]["message"]) == (400, "EOF")


async def test_mid_stream_fault_just_ends_the_stream(
    client: httpx.AsyncClient, app: SimApp
) -> None:
    """Ollama's converters turn the native error line into nothing: the stream stops after
    the tokens sent, with no error event and no closing events."""
    app.config.faults.mid_stream_error_after = 2
    body: dict[str, Any] = {"model": "llama3.2", "input": "x", "stream": True}
    names = [name for name, _ in sse(await client.post("/v1/responses", json=body))]
    assert names[-2:] == ["response.output_text.delta"] * 2
    body = {"model": "llama3.2", "max_tokens": 64, "messages": USER, "stream": True}
    names = [name for name, _ in sse(await client.post("/v1/messages", json=body))]
    assert names[-2:] == ["content_block_delta"] * 2


async def test_tool_call_cut_by_the_ceiling_is_text(client: httpx.AsyncClient) -> None:
    """A token ceiling below the call's length cuts the call short: the answer is the
    truncated text, as when Ollama's tool parser never sees a whole call."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"model": "llama3.2", "messages": USER, "tools": tools, "stream": False}
    r = await client.post("/api/chat", json={**body, "options": {"num_predict": 2}})
    assert r.json()["message"] == {"role": "assistant", "content": text_of(2)}
    assert r.json()["done_reason"] == "length"
    r = await client.post("/api/chat", json=body)
    assert r.json()["message"]["tool_calls"][0]["function"] == {
        "index": 0,
        "name": "f",
        "arguments": {},
    }
    assert re.fullmatch(r"call_[a-z0-9]{8}", r.json()["message"]["tool_calls"][0]["id"])
