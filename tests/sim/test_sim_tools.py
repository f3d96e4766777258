"""Tool calls as the official ``ollama``, ``openai`` and ``anthropic`` clients meet them on a
live simulator: a request offering tools gets a call of the first one, with arguments made
from its schema, streamed and not, on every route that takes tools; the follow-up turn that
carries the tool's result gets text, so an agent loop ends."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import ollama
import openai
import pytest

from corral.sim.harness import SimThread
from corral.sim.text import text_of

pytestmark = pytest.mark.integration

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city"},
        "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "alerts": {"type": "boolean"},
    },
    "required": ["city"],
}
ARGS = {"city": "example", "days": 1, "unit": "celsius", "alerts": True}
FUNCTION = {"name": "get_weather", "description": "The weather in a city", "parameters": SCHEMA}
CHAT_TOOLS: list[Any] = [{"type": "function", "function": FUNCTION}]
QUESTION = "What is the weather in Paris?"


def test_ollama_chat_tool_call(oc: ollama.Client) -> None:
    """/api/chat: ``message.tool_calls`` with the first tool and its arguments, no content;
    streamed, the call comes in one chunk before the final one; the tool's answer gets text."""
    msgs: list[Any] = [{"role": "user", "content": QUESTION}]
    reply = oc.chat(model="llama3.2", messages=msgs, tools=CHAT_TOOLS)
    assert reply.message.content == ""
    assert reply.done_reason == "stop"
    assert reply.message.tool_calls is not None
    [call] = reply.message.tool_calls
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", ARGS)

    chunks = list(oc.chat(model="llama3.2", messages=msgs, tools=CHAT_TOOLS, stream=True))
    assert [bool(c.message.tool_calls) for c in chunks] == [True, False]
    assert [c.done for c in chunks] == [False, True]
    assert all(c.message.content == "" for c in chunks)
    assert chunks[0].message.tool_calls is not None
    assert dict(chunks[0].message.tool_calls[0].function.arguments) == ARGS
    assert chunks[-1].eval_count == 5

    answered = [
        *msgs,
        reply.message,
        {"role": "tool", "content": "Sunny", "tool_name": "get_weather"},
    ]
    final = oc.chat(model="llama3.2", messages=answered, tools=CHAT_TOOLS)
    assert final.message.content == text_of(5)
    assert not final.message.tool_calls


def test_openai_chat_tool_call(ai: openai.OpenAI) -> None:
    """/v1/chat/completions: OpenAI ``tool_calls`` (id, type, JSON string arguments) and
    ``finish_reason: tool_calls``, streamed as one delta; the ``tool`` message gets text."""
    msgs: list[Any] = [{"role": "user", "content": QUESTION}]
    done = ai.chat.completions.create(model="llama3.2", messages=msgs, tools=CHAT_TOOLS)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ""
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == ARGS

    with ai.chat.completions.create(
        model="llama3.2",
        messages=msgs,
        tools=CHAT_TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls for d in deltas if d.tool_calls]
    assert len(calls) == 1
    assert calls[0][0].function is not None
    assert calls[0][0].function.name == "get_weather"
    assert json.loads(calls[0][0].function.arguments or "") == ARGS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5

    answered = [
        *msgs,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
    ]
    final = ai.chat.completions.create(model="llama3.2", messages=answered, tools=CHAT_TOOLS)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == text_of(5)
    assert not final.choices[0].message.tool_calls


def test_openai_responses_function_call(ai: openai.OpenAI) -> None:
    """/v1/responses: a ``function_call`` output item; streamed, its events in Ollama's order;
    a ``function_call_output`` input item gets text."""
    tools: list[Any] = [{"type": "function", "strict": False, **FUNCTION}]
    done = ai.responses.create(model="llama3.2", input=QUESTION, tools=tools)
    [item] = done.output
    assert item.type == "function_call"
    assert item.name == "get_weather"
    assert item.call_id.startswith("call_")
    assert json.loads(item.arguments) == ARGS
    assert done.status == "completed"

    events = list(ai.responses.create(model="llama3.2", input=QUESTION, tools=tools, stream=True))
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(7))
    last = events[-1]
    assert last.type == "response.completed"
    [streamed] = last.response.output
    assert streamed.type == "function_call"
    assert json.loads(streamed.arguments) == ARGS

    history: list[Any] = [
        {"role": "user", "content": QUESTION},
        {
            "type": "function_call",
            "call_id": item.call_id,
            "name": item.name,
            "arguments": item.arguments,
        },
        {"type": "function_call_output", "call_id": item.call_id, "output": "Sunny"},
    ]
    final = ai.responses.create(model="llama3.2", input=history, tools=tools)
    assert final.output_text == text_of(5)
    assert [o.type for o in final.output] == ["message"]


def test_anthropic_messages_tool_use(anthropic_client: anthropic.Anthropic) -> None:
    """/v1/messages: a ``tool_use`` block and ``stop_reason: tool_use``; streamed, the block's
    input arrives as ``input_json_delta`` the client assembles; a ``tool_result`` gets text."""
    tools: list[Any] = [{"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}]
    msgs: list[Any] = [{"role": "user", "content": QUESTION}]
    message = anthropic_client.messages.create(
        model="llama3.2", max_tokens=64, messages=msgs, tools=tools
    )
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("get_weather", ARGS)

    with anthropic_client.messages.stream(
        model="llama3.2", max_tokens=64, messages=msgs, tools=tools
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds
    assert final.stop_reason == "tool_use"
    [streamed] = final.content
    assert streamed.type == "tool_use"
    assert streamed.input == ARGS

    answered = [
        *msgs,
        {"role": "assistant", "content": [block.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "Sunny"}],
        },
    ]
    reply = anthropic_client.messages.create(
        model="llama3.2", max_tokens=64, messages=answered, tools=tools
    )
    assert reply.stop_reason == "end_turn"
    assert [b.type for b in reply.content] == ["text"]
    assert "".join(b.text for b in reply.content if b.type == "text") == text_of(5)


def test_tools_refused_without_the_capability(
    sim: SimThread, ai: openai.OpenAI, anthropic_client: anthropic.Anthropic
) -> None:
    """A model without the tools capability refuses tools on every route, each in its own
    error shape, naming the model fully qualified as Ollama's chat does."""
    model = sim.app.sim.find("qwen2.5:7b")
    assert model is not None
    model[1].capabilities = ("completion",)
    refusal = "registry.ollama.ai/library/qwen2.5:7b does not support tools"
    msgs: list[Any] = [{"role": "user", "content": QUESTION}]
    with pytest.raises(openai.BadRequestError) as err:
        ai.chat.completions.create(model="qwen2.5:7b", messages=msgs, tools=CHAT_TOOLS)
    assert err.value.body == {
        "message": refusal,
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.BadRequestError) as err:
        ai.responses.create(model="qwen2.5:7b", input="x", tools=[{"type": "function", **FUNCTION}])
    assert err.value.message.endswith(refusal)
    tools: list[Any] = [{"name": "get_weather", "input_schema": SCHEMA}]
    with pytest.raises(anthropic.BadRequestError) as bad:
        anthropic_client.messages.create(
            model="qwen2.5:7b", max_tokens=8, messages=msgs, tools=tools
        )
    assert bad.value.body is not None
    assert bad.value.body["error"] == {"type": "invalid_request_error", "message": refusal}
    assert bad.value.body["request_id"].startswith("req_")
