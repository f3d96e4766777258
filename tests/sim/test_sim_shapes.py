"""Response shapes of the simulator's Ollama routes, in-process through httpx.ASGITransport."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from corral.sim import SimConfig, create_sim_app
from corral.sim.app import SimApp
from corral.sim.text import text_of

UTC_NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
LOCAL_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)$")


@pytest.fixture
def app() -> SimApp:
    return create_sim_app(SimConfig(tokens=4))


def lines(resp: httpx.Response) -> list[dict[str, Any]]:
    """The NDJSON lines of a response (there must be no blank lines)."""
    text = resp.text
    assert text.endswith("\n")
    return [json.loads(line) for line in text[:-1].split("\n")]


async def test_root_and_version(client: httpx.AsyncClient) -> None:
    """GET / says Ollama is running in text/plain; HEAD has the length and no body."""
    r = await client.get("/")
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert r.headers["content-type"].startswith("text/plain")
    h = await client.head("/")
    assert (h.status_code, h.content, h.headers["content-length"]) == (200, b"", "17")
    assert (await client.get("/api/version")).json() == {"version": "0.33.0"}


async def test_unknown_path_and_wrong_method(client: httpx.AsyncClient) -> None:
    """Gin's 404 and 405 bodies: plain text, not JSON."""
    r = await client.get("/api/nope")
    assert (r.status_code, r.text) == (404, "404 page not found")
    r = await client.get("/api/generate")
    assert (r.status_code, r.text) == (405, "405 method not allowed")
    assert (await client.head("/api/ps")).status_code == 405
    assert (await client.get("/v1/models/a/b")).status_code == 404


async def test_generate_stream_shape(client: httpx.AsyncClient) -> None:
    """Intermediate chunks carry only model/created_at/response/done; the final one the
    metrics, done_reason and context, zero fields omitted."""
    r = await client.post("/api/generate", json={"model": "llama3.2", "prompt": "why blue"})
    assert r.headers["content-type"] == "application/x-ndjson"
    chunks = lines(r)
    assert len(chunks) == 5
    for chunk in chunks[:-1]:
        assert list(chunk) == ["model", "created_at", "response", "done"]
        assert chunk["model"] == "llama3.2"
        assert chunk["done"] is False
        assert UTC_NANO.match(chunk["created_at"])
    assert "".join(c["response"] for c in chunks) == text_of(4) == "The sky is blue"
    final = chunks[-1]
    assert list(final) == [
        "model", "created_at", "response", "done", "done_reason", "context", "total_duration",
        "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
        "eval_duration",
    ]  # fmt: skip
    assert final["done_reason"] == "stop"
    assert final["eval_count"] == 4
    assert final["prompt_eval_count"] == 2 + 10


async def test_generate_non_stream_and_num_predict(client: httpx.AsyncClient) -> None:
    """stream:false answers one JSON object; num_predict sets the count and reason length."""
    body = {"model": "LLAMA3.2:latest", "prompt": "x", "stream": False, "raw": True,
            "options": {"num_predict": 6}}  # fmt: skip
    r = await client.post("/api/generate", json=body)
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    data = r.json()
    assert data["response"] == text_of(6)
    assert data["eval_count"] == 6
    assert data["done_reason"] == "length"
    assert "context" not in data
    assert data["model"] == "LLAMA3.2:latest"  # echoed as sent


async def test_json_accepted_whatever_content_type(client: httpx.AsyncClient) -> None:
    """Like Gin's ShouldBindJSON, a form content type still decodes as JSON."""
    r = await client.post(
        "/api/generate",
        content=b'{"model":"llama3.2","prompt":"x","stream":false}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200
    assert r.json()["done"] is True


async def test_chat_chunks_always_carry_role(client: httpx.AsyncClient) -> None:
    """Every chat chunk, the final one included, has message.role assistant."""
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "tools": []}
    chunks = lines(await client.post("/api/chat", json=body))
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    assert "".join(c["message"]["content"] for c in chunks) == text_of(4)
    assert list(chunks[-1])[:5] == ["model", "created_at", "message", "done", "done_reason"]
    r = await client.post("/api/chat", json={**body, "stream": False})
    assert r.json()["message"] == {"role": "assistant", "content": text_of(4)}


async def test_load_and_unload(client: httpx.AsyncClient) -> None:
    """An empty prompt loads (done_reason load, one JSON object); keep_alive 0 unloads."""
    r = await client.post("/api/generate", json={"model": "llama3.2"})
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() | {"created_at": ""} == {
        "model": "llama3.2", "created_at": "", "response": "", "done": True, "done_reason": "load"
    }  # fmt: skip
    ps = (await client.get("/api/ps")).json()["models"]
    assert [m["name"] for m in ps] == ["llama3.2:latest"]
    r = await client.post("/api/chat", json={"model": "llama3.2", "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    assert r.json()["message"] == {"role": "assistant", "content": ""}
    assert (await client.get("/api/ps")).json() == {"models": []}


async def test_ps_shape(client: httpx.AsyncClient) -> None:
    """/api/ps lists size, size_vram, local expires_at and context_length in Go key order."""
    assert (await client.get("/api/ps")).json() == {"models": []}
    await client.post("/api/generate", json={"model": "qwen2.5:7b", "keep_alive": "1h"})
    (entry,) = (await client.get("/api/ps")).json()["models"]
    assert list(entry) == [
        "name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"
    ]  # fmt: skip
    assert entry["size"] == entry["size_vram"] == 4683087332
    assert entry["context_length"] == 32768  # the 24 GiB tier default
    assert LOCAL_TIME.match(entry["expires_at"])
    assert entry["details"]["parent_model"] == ""


async def test_keep_alive_forever_and_invalid(client: httpx.AsyncClient) -> None:
    """A negative keep_alive shows ~292 years ahead; a unitless string is a 400."""
    await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": -1})
    (entry,) = (await client.get("/api/ps")).json()["models"]
    assert entry["expires_at"].startswith("23")
    r = await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": "300"})
    assert r.status_code == 400
    assert r.json() == {"error": 'time: missing unit in duration "300"'}
    r = await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": True})
    assert r.json() == {"error": "Unsupported type: 'bool'"}


async def test_num_gpu_zero_loads_on_cpu(client: httpx.AsyncClient) -> None:
    """options.num_gpu 0 gives size_vram 0 (100% CPU in ollama ps)."""
    body = {"model": "llama3.2", "options": {"num_gpu": 0}}
    await client.post("/api/generate", json=body)
    (entry,) = (await client.get("/api/ps")).json()["models"]
    assert entry["size_vram"] == 0
    assert entry["size"] > 0


async def test_tags_and_show(client: httpx.AsyncClient) -> None:
    """/api/tags lists the default models newest first; /api/show has model_info, details,
    capabilities and modified_at."""
    tags = (await client.get("/api/tags")).json()["models"]
    assert [m["name"] for m in tags] == ["llama3.2:latest", "qwen2.5:7b", "all-minilm:latest"]
    # Ollama 0.33's ListModelResponse field order, capabilities included
    assert list(tags[0]) == [
        "name",
        "model",
        "modified_at",
        "size",
        "digest",
        "details",
        "capabilities",
    ]
    assert tags[0]["capabilities"] == ["completion", "tools"]
    assert re.fullmatch(r"[0-9a-f]{64}", tags[0]["digest"])
    assert LOCAL_TIME.match(tags[0]["modified_at"])
    show = (await client.post("/api/show", json={"model": "llama3.2"})).json()
    assert show["model_info"]["llama.context_length"] == 131072
    assert show["model_info"]["general.parameter_count"] == 3_200_000_000
    assert show["capabilities"] == ["completion", "tools"]
    assert show["details"]["family"] == "llama"
    assert LOCAL_TIME.match(show["modified_at"])
    emb = (await client.post("/api/show", json={"name": "all-minilm"})).json()
    assert emb["capabilities"] == ["embedding"]


async def test_embed_and_embeddings(client: httpx.AsyncClient) -> None:
    """/api/embed returns normalised vectors per input (deterministic); dimensions truncates;
    the legacy route one vector; empty input only loads."""
    r = (await client.post("/api/embed", json={"model": "all-minilm", "input": ["a", "b"]})).json()
    assert list(r)[:2] == ["model", "embeddings"]
    assert len(r["embeddings"]) == 2
    vec = r["embeddings"][0]
    assert len(vec) == 384
    assert abs(sum(x * x for x in vec) - 1) < 1e-4
    again = (await client.post("/api/embed", json={"model": "all-minilm", "input": "a"})).json()
    assert again["embeddings"][0] == vec
    small = {"model": "all-minilm", "input": "a", "dimensions": 8}
    assert len((await client.post("/api/embed", json=small)).json()["embeddings"][0]) == 8
    empty = (await client.post("/api/embed", json={"model": "all-minilm"})).json()
    assert empty["embeddings"] == []
    bad = await client.post("/api/embed", json={"model": "all-minilm", "input": 3})
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid input type"})
    legacy = {"model": "all-minilm", "prompt": "a"}
    assert len((await client.post("/api/embeddings", json=legacy)).json()["embedding"]) == 384
    legacy_load = {"model": "all-minilm", "prompt": ""}
    assert (await client.post("/api/embeddings", json=legacy_load)).json() == {"embedding": []}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/api/generate", {"model": "foo"}, 404, "model 'foo' not found"),
        ("POST", "/api/generate", {"model": ""}, 404, "model '' not found"),
        ("POST", "/api/chat", {"model": ""}, 400, "model is required"),
        ("POST", "/api/chat", {"model": "foo", "messages": []}, 404, "model 'foo' not found"),
        ("POST", "/api/embed", {"model": "foo", "input": "x"}, 404, "model 'foo' not found"),
        ("POST", "/api/embeddings", {"model": "foo"}, 404,
         'model "foo" not found, try pulling it first'),
        ("POST", "/api/show", {"model": "foo"}, 404, "model 'foo:latest' not found"),
        ("POST", "/api/show", {}, 400, "model is required"),
        ("POST", "/api/copy", {"source": "foo", "destination": "bar"}, 404,
         'model "foo" not found'),
        ("POST", "/api/copy", {"source": "a b", "destination": "bar"}, 400,
         'source "a b" is invalid'),
        ("DELETE", "/api/delete", {"model": "foo"}, 404, "model 'foo' not found"),
        ("DELETE", "/api/delete", {"model": "a b"}, 400, 'name "a b" is invalid'),
        ("POST", "/api/pull", {"model": "a b"}, 400, "invalid model name"),
        ("POST", "/api/pull", {"model": "doesnotexist", "stream": False}, 500,
         "pull model manifest: file does not exist"),
        ("POST", "/api/push", {}, 400, "model is required"),
        ("POST", "/api/create", {"model": "x"}, 400, "neither 'from' or 'files' was specified"),
        ("POST", "/api/generate", None, 400, "missing request body"),
        ("POST", "/api/generate", [1], 400,
         "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
        ("POST", "/api/generate", {"model": "llama3.2", "prompt": 1}, 400,
         "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type "
         "string"),
        ("POST", "/api/generate", {"model": "all-minilm", "prompt": "x"}, 400,
         '"all-minilm" does not support generate'),
        ("POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "think": True}, 400,
         '"llama3.2" does not support thinking'),
        ("POST", "/api/generate", {"model": "llama3.2", "raw": True, "system": "s"}, 400,
         "raw mode does not support template, system, or context"),
        ("POST", "/api/chat", {"model": "all-minilm:latest", "messages": []}, 400,
         '"all-minilm:latest" does not support chat'),
        ("POST", "/api/blobs/sha256:zz", None, 400, "invalid digest format"),
    ],
)  # fmt: skip
async def test_native_errors(
    client: httpx.AsyncClient, method: str, path: str, body: Any, status: int, error: str
) -> None:
    """Early errors have Ollama's status and exact {"error": ...} body."""
    content = b"" if body is None else json.dumps(body).encode()
    r = await client.request(method, path, content=content)
    assert r.status_code == status
    assert r.json() == {"error": error}


async def test_malformed_json_message(client: httpx.AsyncClient) -> None:
    """Malformed JSON gets Go's decoder message."""
    r = await client.post("/api/chat", content=b"xyz")
    assert r.json() == {"error": "invalid character 'x' looking for beginning of value"}


async def test_tools_on_model_without_tools(client: httpx.AsyncClient, app: SimApp) -> None:
    """Tools on a model lacking the capability name the fully qualified model."""
    app.config.models[0].capabilities = ("completion",)
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}  # fmt: skip
    r = await client.post("/api/chat", json=body)
    assert (r.status_code, r.json()) == (
        400,
        {"error": "registry.ollama.ai/library/llama3.2:latest does not support tools"},
    )


async def test_integer_option_of_wrong_type(client: httpx.AsyncClient) -> None:
    """An integer option given as a string fails with Ollama's option message."""
    body = {"model": "llama3.2", "prompt": "x", "options": {"num_ctx": "big"}}
    r = await client.post("/api/generate", json=body)
    assert r.status_code == 500
    assert r.json() == {"error": 'option "num_ctx" must be of type integer'}


@pytest.mark.parametrize(
    ("host", "status"),
    [("example.com", 403), ("localhost:11434", 200), ("10.0.0.7:11434", 200),
     ("[::1]:11434", 200), ("gpu0.internal", 200), ("8.8.8.8", 403)],
)  # fmt: skip
async def test_check_host(host: str, status: int) -> None:
    """With check_host, a Host header Ollama (bound to loopback) rejects gets 403, empty."""
    app = create_sim_app(SimConfig(check_host=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        r = await c.get("/api/version", headers={"host": host})
    assert r.status_code == status
    if status == 403:
        assert r.content == b""


async def test_null_options_are_ignored(client: httpx.AsyncClient) -> None:
    """Options sent as null (LangChain's OllamaEmbeddings does) are skipped, as Ollama's
    option parsing skips them, instead of a 500."""
    options = {"num_ctx": None, "temperature": None, "num_predict": None}
    emb = await client.post(
        "/api/embed", json={"model": "all-minilm", "input": "hi", "options": options}
    )
    assert emb.status_code == 200, emb.text
    gen = await client.post(
        "/api/generate",
        json={"model": "llama3.2", "prompt": "hi", "stream": False, "options": options},
    )
    assert gen.status_code == 200, gen.text
