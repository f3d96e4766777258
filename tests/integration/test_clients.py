"""The official ollama, openai and anthropic Python clients against corral, as users meet it."""

from __future__ import annotations

from typing import Any

import anthropic
import ollama
import openai
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def corral(sim_factory: Any, corral_factory: Any) -> Any:
    a, b = sim_factory(name="a"), sim_factory(name="b")
    return corral_factory([{"id": "gpu0", "url": a.url}, {"id": "gpu1", "url": b.url}])


def test_ollama_client(corral: Any) -> None:
    """generate, chat (streaming and not), embed, embeddings, list, ps, show all work."""
    client = ollama.Client(host=corral.url)
    try:
        _exercise_ollama(client)
    finally:
        client._client.close()


def _exercise_ollama(client: ollama.Client) -> None:
    gen = client.generate(model="llama3.2", prompt="Why is the sky blue?")
    assert gen.done
    assert gen.response
    assert gen.eval_count == 16
    parts = list(client.generate(model="llama3.2", prompt="hi", stream=True))
    assert parts[-1].done
    assert "".join(p.response for p in parts) == gen.response
    chat = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert chat.message.role == "assistant"
    assert chat.message.content
    chunks = list(
        client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert "".join(c.message.content for c in chunks) == chat.message.content
    emb = client.embed(model="all-minilm", input=["a", "b"])
    assert len(emb.embeddings) == 2
    assert client.embeddings(model="all-minilm", prompt="a").embedding
    names = [m.model for m in client.list().models]
    assert "llama3.2:latest" in names
    assert len(names) == len(set(names))
    running = client.ps().models
    assert {m.model for m in running} >= {"llama3.2:latest"}
    show = client.show("llama3.2")
    assert show.modelinfo is not None
    assert "completion" in (show.capabilities or [])
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope", prompt="x")
    assert info.value.status_code == 404
    assert info.value.error == "model 'nope' not found"


def test_openai_client(corral: Any) -> None:
    """chat (streaming and not), completions, embeddings and models via the openai package."""
    client = openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused")
    try:
        done = client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]
        )
        assert done.choices[0].message.content
        assert done.usage is not None
        assert done.usage.completion_tokens == 16
        stream = client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == done.choices[0].message.content
        comp = client.completions.create(model="llama3.2", prompt="hi")
        assert comp.choices[0].text
        emb = client.embeddings.create(model="all-minilm", input=["a", "b"])
        assert len(emb.data) == 2
        ids = [m.id for m in client.models.list()]
        assert "llama3.2:latest" in ids
        assert client.models.retrieve("llama3.2:latest").id == "llama3.2:latest"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        client.close()


def test_openai_responses(corral: Any) -> None:
    """The openai package's Responses API (what OpenAI's newer clients speak), streamed and
    not, through corral; an unknown model raises its NotFoundError."""
    client = openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused")
    try:
        done = client.responses.create(model="llama3.2", input="Why is the sky blue?")
        assert done.status == "completed"
        assert done.output_text
        assert done.usage is not None
        assert done.usage.output_tokens == 16
        events = list(client.responses.create(model="llama3.2", input="hi", stream=True))
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == done.output_text
        assert events[-1].type == "response.completed"
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="nope", input="hi")
    finally:
        client.close()


def test_anthropic_messages(corral: Any) -> None:
    """The anthropic package's Messages API (what Anthropic's clients speak), streamed and not,
    through corral; an unknown model raises its NotFoundError from corral's own 404."""
    client = anthropic.Anthropic(base_url=corral.url, api_key="unused")
    try:
        message = client.messages.create(
            model="llama3.2",
            max_tokens=64,
            system="You are terse.",
            messages=[{"role": "user", "content": "hi"}],
        )
        assert message.role == "assistant"
        assert message.stop_reason == "end_turn"
        text = "".join(b.text for b in message.content if b.type == "text")
        assert text
        assert message.usage.output_tokens == 16
        with client.messages.stream(
            model="llama3.2", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed == text
        assert final.stop_reason == "end_turn"
        with pytest.raises(anthropic.NotFoundError) as info:
            client.messages.create(
                model="nope", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.body == {
            "type": "error",
            "error": {"type": "not_found_error", "message": "model 'nope' not found"},
        }
    finally:
        client.close()


def test_openai_audio_transcription(corral: Any) -> None:
    """The openai package's audio.transcriptions: the multipart upload is routed by its model
    field and answered; an unknown model raises NotFoundError."""
    client = openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused", max_retries=0)
    audio = ("speech.wav", b"RIFF" + b"\0" * 40_000, "audio/wav")
    try:
        done = client.audio.transcriptions.create(model="llama3.2", file=audio)
        assert done.text
        with pytest.raises(openai.NotFoundError):
            client.audio.transcriptions.create(model="nope", file=audio)
    finally:
        client.close()
