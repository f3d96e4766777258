"""Model management, /v1 shapes, faults and /_sim control, in-process via httpx.ASGITransport."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import httpx
import pytest

from corral.sim import SimConfig, create_sim_app
from corral.sim.app import SimApp
from corral.sim.text import text_of
from tests.helpers import ndjson


@pytest.fixture
def app() -> SimApp:
    return create_sim_app(SimConfig(tokens=3))


def events(resp: httpx.Response) -> list[str]:
    """The data payloads of an SSE body (each event is ``data: ...\\n\\n``)."""
    assert resp.text.endswith("\n\n")
    parts = resp.text[:-2].split("\n\n")
    assert all(p.startswith("data: ") for p in parts)
    return [p[len("data: ") :] for p in parts]


async def names(client: httpx.AsyncClient) -> list[str]:
    return [m["name"] for m in (await client.get("/api/tags")).json()["models"]]


async def test_pull_stream_sequence(client: httpx.AsyncClient) -> None:
    """Pull streams manifest, per-layer progress (no completed while 0), verify, write,
    success; the model is then listed."""
    r = await client.post("/api/pull", json={"model": "mistral"})
    out = ndjson(r)
    statuses = [o["status"] for o in out]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    first_layer = out[1]
    assert list(first_layer) == ["status", "digest", "total"]
    assert first_layer["status"] == "pulling " + first_layer["digest"][7:19]
    assert all(o["completed"] == o["total"] for o in out[5:-3])
    assert "mistral:latest" in await names(client)
    r = await client.post("/api/pull", json={"model": "gemma3:1b", "stream": False})
    assert r.json() == {"status": "success"}


async def test_pull_unknown_streams_error_after_manifest(client: httpx.AsyncClient) -> None:
    """An unknown model streams the manifest line, then Ollama's error line, status 200."""
    r = await client.post("/api/pull", json={"model": "library/doesnotexist:7b"})
    assert r.status_code == 200
    assert ndjson(r) == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]


async def test_copy_delete(client: httpx.AsyncClient) -> None:
    """Copy answers 200 with an empty body and shares the digest; delete removes."""
    r = await client.post("/api/copy", json={"source": "llama3.2", "destination": "backup"})
    assert (r.status_code, r.content) == (200, b"")
    tags = {m["name"]: m for m in (await client.get("/api/tags")).json()["models"]}
    assert tags["backup:latest"]["digest"] == tags["llama3.2:latest"]["digest"]
    r = await client.request("DELETE", "/api/delete", json={"model": "backup"})
    assert (r.status_code, r.content) == (200, b"")
    assert "backup:latest" not in await names(client)


async def test_blobs_and_create_from_files(client: httpx.AsyncClient) -> None:
    """Blob upload checks the digest (400 mismatch, 201 created, 200 exists); HEAD reports
    existence; create from files uses the blob."""
    data = b"GGUF fake weights"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert (await client.head(f"/api/blobs/{digest}")).status_code == 404
    bad = await client.post(f"/api/blobs/{digest}", content=b"other")
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("digest mismatch")
    assert (await client.post(f"/api/blobs/{digest}", content=data)).status_code == 201
    assert (await client.post(f"/api/blobs/{digest}", content=data)).status_code == 200
    assert (await client.head(f"/api/blobs/{digest.replace(':', '-')}")).status_code == 200
    body = {"model": "mine", "files": {"m.gguf": digest}, "stream": False}
    assert (await client.post("/api/create", json=body)).json() == {"status": "success"}
    tags = {m["name"]: m for m in (await client.get("/api/tags")).json()["models"]}
    assert tags["mine:latest"]["size"] == len(data)


async def test_create_from_and_push(client: httpx.AsyncClient) -> None:
    """Create from an existing model streams statuses ending in success; push streams layers."""
    body = {"model": "user/custom", "from": "llama3.2", "system": "be brief"}
    out = ndjson(await client.post("/api/create", json=body))
    assert out[0]["status"].startswith("using existing layer sha256:")
    assert [o["status"] for o in out[-2:]] == ["writing manifest", "success"]
    assert "user/custom:latest" in await names(client)
    pushed = ndjson(await client.post("/api/push", json={"model": "user/custom"}))
    assert pushed[0] == {"status": "retrieving manifest"}
    assert pushed[-1] == {"status": "success"}
    assert any(o["status"].startswith("pushing ") and "digest" in o for o in pushed)


async def test_v1_chat_non_stream(client: httpx.AsyncClient) -> None:
    """/v1 defaults to non-streaming and answers OpenAI's chat.completion."""
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi there"}]}
    data = (await client.post("/v1/chat/completions", json=body)).json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["system_fingerprint"] == "fp_ollama"
    assert data["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": text_of(3)},
         "finish_reason": "stop"}
    ]  # fmt: skip
    assert data["usage"]["completion_tokens"] == 3


async def test_v1_chat_stream_format(client: httpx.AsyncClient) -> None:
    """SSE: role only in the first delta, a finish chunk with delta {}, a usage chunk with
    choices [], then [DONE]; created identical on every chunk."""
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}],
            "stream": True, "max_tokens": 2, "stream_options": {"include_usage": True}}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"] == "text/event-stream"
    payloads = events(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "The"}
    assert chunks[1]["choices"][0]["delta"] == {"content": " sky"}
    assert chunks[2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert chunks[3]["choices"] == []
    assert chunks[3]["usage"]["completion_tokens"] == 2
    assert len({c["created"] for c in chunks}) == 1
    assert len({c["id"] for c in chunks}) == 1


async def test_v1_completions(client: httpx.AsyncClient) -> None:
    """/v1/completions: text_completion; streaming chunks put choices before model."""
    data = (await client.post("/v1/completions", json={"model": "llama3.2", "prompt": "x"})).json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == text_of(3)
    body = {"model": "llama3.2", "prompt": "x", "stream": True}
    payloads = events(await client.post("/v1/completions", json=body))
    first = json.loads(payloads[0])
    assert list(first) == ["id", "object", "created", "choices", "model", "system_fingerprint"]
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "stop"
    assert payloads[-1] == "[DONE]"


async def test_v1_embeddings_and_models(client: httpx.AsyncClient) -> None:
    """/v1/embeddings in float and base64; /v1/models list and retrieve."""
    body = {"model": "all-minilm", "input": ["a", "b c"]}
    data = (await client.post("/v1/embeddings", json=body)).json()
    assert data["object"] == "list"
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    b64 = (await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert floats[0] == pytest.approx(data["data"][0]["embedding"][0], rel=1e-6)
    bad = await client.post("/v1/embeddings", json={"model": "all-minilm", "input": []})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "invalid input"
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert models["data"][0] == {
        "id": "llama3.2:latest", "object": "model", "created": models["data"][0]["created"],
        "owned_by": "library",
    }  # fmt: skip
    one = (await client.get("/v1/models/qwen2.5:7b")).json()
    assert one["id"] == "qwen2.5:7b"


async def test_v1_models_null_when_empty(client: httpx.AsyncClient, app: SimApp) -> None:
    """With no local models /v1/models has data null (Ollama's quirk); tags/ps stay []."""
    app.config.models.clear()
    assert (await client.get("/v1/models")).json() == {"object": "list", "data": None}
    assert (await client.get("/api/tags")).json() == {"models": []}


async def test_v1_errors_openai_shape(client: httpx.AsyncClient) -> None:
    """/v1 errors use OpenAI's shape with type by status."""
    r = await client.post("/v1/chat/completions", json={"model": "foo", "messages": []})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "[] is too short - 'messages'",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    r = await client.post(
        "/v1/chat/completions", json={"model": "foo", "messages": [{"role": "user"}]}
    )
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
    r = await client.get("/v1/models/nope")
    assert r.json()["error"]["message"] == "model 'nope:latest' not found"


async def test_fault_busy_and_error_rate(client: httpx.AsyncClient, app: SimApp) -> None:
    """busy gives Ollama's 503 text; error_rate 1 gives a 500 before any byte."""
    app.config.faults.busy = True
    r = await client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
    assert r.status_code == 503
    assert r.json() == {
        "error": "server busy, please try again.  maximum pending requests exceeded"
    }
    r = await client.post("/v1/completions", json={"model": "llama3.2", "prompt": "x"})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "api_error"
    app.config.faults.busy = False
    app.config.faults.error_rate = 1.0
    r = await client.post("/api/chat", json={"model": "llama3.2", "messages": [{"content": "x"}]})
    assert r.status_code == 500
    assert "error" in r.json()
    assert (await client.get("/api/tags")).status_code == 200  # not an inference route


async def test_fault_mid_stream_error(client: httpx.AsyncClient, app: SimApp) -> None:
    """mid_stream_error_after N: N token lines then Ollama's error line, status 200; before the
    first byte (N=0, or stream false) it is a real 500; on /v1 the stream lacks [DONE]."""
    app.config.faults.mid_stream_error_after = 2
    r = await client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
    out = ndjson(r)
    assert r.status_code == 200
    assert len(out) == 3
    assert out[-1] == {"error": "an error was encountered while running the model"}
    body = {"model": "llama3.2", "prompt": "x", "stream": False}
    assert (await client.post("/api/generate", json=body)).status_code == 500
    v1 = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True}
    payloads = events(await client.post("/v1/chat/completions", json=v1))
    assert "[DONE]" not in payloads
    assert json.loads(payloads[-1])["choices"][0]["delta"] == {"content": ""}
    app.config.faults.mid_stream_error_after = 0
    r = await client.post("/api/chat", json={"model": "llama3.2", "messages": [{"content": "x"}]})
    assert r.status_code == 500


async def test_control_endpoints(client: httpx.AsyncClient) -> None:
    """/_sim/faults and /_sim/config take partial updates and reject bad ones; /_sim/stats
    counts requests by route with the X-Request-ID; /_sim/reset clears."""
    r = await client.put("/_sim/faults", json={"slow_s": 0.0, "drop_after_tokens": 5})
    assert r.json()["drop_after_tokens"] == 5
    assert (await client.get("/_sim/faults")).json()["drop_after_tokens"] == 5
    assert (await client.put("/_sim/faults", json={"nope": 1})).status_code == 400
    assert (await client.put("/_sim/faults", json={"hang": "yes"})).status_code == 400
    await client.put("/_sim/faults", json={"drop_after_tokens": None})
    assert (await client.put("/_sim/config", json={"tokens": 2})).json()["tokens"] == 2
    assert (await client.put("/_sim/config", json={"num_parallel": 0})).status_code == 400
    await client.post(
        "/api/generate",
        json={"model": "llama3.2", "prompt": "x", "stream": False},
        headers={"x-request-id": "req-1"},
    )
    await client.post("/api/generate", json={"model": "nope"})
    stats = (await client.get("/_sim/stats")).json()
    assert stats["name"] == "sim"
    assert (stats["requests_total"], stats["completed"], stats["failed"]) == (2, 1, 1)
    assert stats["by_route"] == {"/api/generate": 2}
    first = stats["recent"][0]
    assert (first["request_id"], first["model"], first["status"]) == ("req-1", "llama3.2", 200)
    assert first["host"] == "sim"
    assert first["ended"] >= first["started"]
    await client.post("/_sim/reset")
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["requests_total"], stats["recent"], stats["in_flight"]) == (0, [], 0)
