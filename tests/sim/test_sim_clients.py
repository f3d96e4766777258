"""The official ``ollama`` and ``openai`` Python clients against a live simulator."""

from __future__ import annotations

import ollama
import openai
import pytest

from corral.sim.text import text_of

pytestmark = pytest.mark.integration


def test_ollama_generate_and_chat(oc: ollama.Client) -> None:
    """generate and chat, streaming and not, parse into the client's models."""
    assert oc.generate(model="llama3.2", prompt="why?").response == text_of(5)
    parts = list(oc.generate(model="llama3.2", prompt="why?", stream=True))
    assert parts[-1].done
    assert parts[-1].eval_count == 5
    msgs = [{"role": "user", "content": "hi"}]
    reply = oc.chat(model="llama3.2", messages=msgs, options={"num_predict": 2})
    assert reply.message.content == "The sky"
    assert reply.done_reason == "length"
    chunks = list(oc.chat(model="llama3.2", messages=msgs, stream=True))
    assert "".join(c.message.content or "" for c in chunks) == text_of(5)
    assert all(c.message.role == "assistant" for c in chunks)


def test_ollama_embed_list_ps_show(oc: ollama.Client) -> None:
    """embed, embeddings, list, ps and show validate in the client."""
    assert len(oc.embed(model="all-minilm", input=["a", "b"]).embeddings) == 2
    assert len(oc.embeddings(model="all-minilm", prompt="a").embedding) == 384
    assert "llama3.2:latest" in [m.model for m in oc.list().models]
    oc.generate(model="qwen2.5:7b", prompt="", keep_alive="10m")
    running = {m.model: m for m in oc.ps().models}
    assert running["qwen2.5:7b"].size_vram == running["qwen2.5:7b"].size
    assert running["qwen2.5:7b"].expires_at is not None
    shown = oc.show("llama3.2")
    assert shown.modelinfo is not None
    assert shown.capabilities == ["completion", "tools"]


def test_ollama_pull_copy_delete(oc: ollama.Client) -> None:
    """pull (streaming and not), copy and delete, and the client's errors."""
    assert oc.pull("tinyllama").status == "success"
    statuses = [p.status for p in oc.pull("gemma3:1b", stream=True)]
    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    oc.copy("tinyllama", "tiny-copy")
    assert "tiny-copy:latest" in [m.model for m in oc.list().models]
    oc.delete("tiny-copy")
    assert "tiny-copy:latest" not in [m.model for m in oc.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        oc.pull("doesnotexist")
    assert err.value.status_code == 500
    with pytest.raises(ollama.ResponseError) as err:
        oc.generate(model="nope", prompt="x")
    assert (err.value.status_code, err.value.error) == (404, "model 'nope' not found")
    with pytest.raises(ollama.ResponseError) as err:
        list(oc.pull("doesnotexist", stream=True))
    assert err.value.error == "pull model manifest: file does not exist"


def test_openai_chat(ai: openai.OpenAI) -> None:
    """chat.completions, non-streaming and streaming with usage."""
    msgs: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "x"}]
    done = ai.chat.completions.create(model="llama3.2", messages=msgs)
    assert done.choices[0].message.content == text_of(5)
    assert done.usage is not None
    assert done.usage.completion_tokens == 5
    with ai.chat.completions.create(
        model="llama3.2", messages=msgs, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == text_of(5)
    assert chunks[-1].usage is not None


def test_openai_completions_embeddings_models(ai: openai.OpenAI) -> None:
    """completions, embeddings (the client asks for base64) and the models routes."""
    comp = ai.completions.create(model="llama3.2", prompt="x", max_tokens=3)
    assert comp.choices[0].text == "The sky is"
    assert comp.choices[0].finish_reason == "length"
    emb = ai.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(emb.data) == 2
    assert len(emb.data[0].embedding) == 384
    assert "llama3.2:latest" in [m.id for m in ai.models.list()]
    assert ai.models.retrieve("llama3.2").owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        ai.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        ai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
