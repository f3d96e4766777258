"""The front door's route table, in-process over ASGI with the backends behind a scripted
FakeTransport: Ollama's own 404/405/400/413 answers and the headers that cross corral
(non-streaming routes only: ``ASGITransport`` buffers bodies)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from corral.app import CorralApp, create_app
from corral.errors import UpstreamConnectError
from corral.fleet.gpu.sampler import NullSampler
from corral.proxy.request import HOP_BY_HOP
from corral.upstream import Upstream
from tests.helpers import Answer, FakeTransport, asgi_client, base_url, offline_settings

A = base_url("a")
GENERATED = {"model": "m", "response": "hi", "done": True, "eval_count": 1}


@dataclass
class Front:
    client: httpx.AsyncClient
    fake: FakeTransport
    app: CorralApp


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    fake = FakeTransport().ollama(A, "m")
    settings = offline_settings("a", server={"max_body_mb": 0.001})  # 1000 bytes
    app = create_app(
        settings,
        upstream=Upstream(settings.timeouts, transport=fake),
        gpu_sampler=NullSampler(),
    )
    async with asgi_client(app) as client:
        assert app.runtime.registry.get("a").healthy  # the lifespan probed it
        yield Front(client, fake, app)
    assert fake.pool_stats() == (0, 0)
    assert fake.closed  # the lifespan's shutdown closed the upstream


async def test_wrong_method_is_405_in_ollamas_words(front: Front) -> None:
    """GET on a POST-only Ollama route answers 405 "405 method not allowed", as Ollama does."""
    r = await front.client.get("/api/generate")
    assert r.status_code == 405
    assert r.text == "405 method not allowed"
    assert r.headers["content-type"].startswith("text/plain")
    assert front.fake.sent() == []


@pytest.mark.parametrize("path", ["/api/nonexistent", "/v1/nothing", "/api"])
async def test_unknown_path_is_404_page_not_found(front: Front, path: str) -> None:
    """A path Ollama does not have answers Ollama's plain "404 page not found"."""
    r = await front.client.post(path, json={"model": "m"})
    assert r.status_code == 404
    assert r.text == "404 page not found"
    assert front.fake.sent() == []


async def test_invalid_json_is_400_in_ollamas_shape(front: Front) -> None:
    """Malformed JSON on an Ollama route: 400 {"error": "invalid JSON: …"}, nothing sent on."""
    r = await front.client.post("/api/generate", content=b'{"model": "m",')
    assert r.status_code == 400
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"].startswith("invalid JSON")
    assert front.fake.sent() == []


async def test_invalid_json_is_400_in_openais_shape_on_v1(front: Front) -> None:
    """Malformed JSON on /v1: 400 with OpenAI's error object (message, type, param, code)."""
    r = await front.client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith("invalid JSON")
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["code"] is None
    assert front.fake.sent() == []


async def test_body_over_the_limit_is_413_and_closes_the_connection(front: Front) -> None:
    """A body past server.max_body_mb: 413 with Connection: close, nothing sent on."""
    big = {"model": "m", "prompt": "x" * 2000}
    r = await front.client.post("/api/generate", json=big)
    assert r.status_code == 413
    assert r.headers["connection"] == "close"
    assert "request body too large" in r.json()["error"]
    assert front.fake.sent() == []


async def test_request_id_goes_to_the_backend_and_back(front: Front) -> None:
    """The client's X-Request-ID reaches the backend and comes back on the answer."""
    front.fake.script(A, Answer.json(GENERATED))
    r = await front.client.post(
        "/api/generate",
        json={"model": "m", "prompt": "hi", "stream": False},
        headers={"X-Request-ID": "req-42"},
    )
    assert r.status_code == 200
    assert r.json() == GENERATED
    assert r.headers["x-request-id"] == "req-42"
    assert r.headers["x-corral-backend"] == "a"
    (sent,) = front.fake.sent("/api/generate")
    assert [v for k, v in sent.headers if k == b"x-request-id"] == [b"req-42"]


async def test_request_id_is_made_when_the_client_sends_none(front: Front) -> None:
    """Without X-Request-ID corral makes one, and the backend and the client see the same."""
    front.fake.script(A, Answer.json(GENERATED))
    r = await front.client.post("/api/generate", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 200
    (sent,) = front.fake.sent("/api/generate")
    assert r.headers["x-request-id"]
    assert sent.header("x-request-id") == r.headers["x-request-id"]


async def test_keys_are_never_forwarded(front: Front) -> None:
    """Authorization and X-API-Key stay at corral: the backend never sees a client's key."""
    front.fake.script(A, Answer.json(GENERATED))
    r = await front.client.post(
        "/api/generate",
        json={"model": "m", "prompt": "hi", "stream": False},
        headers={"Authorization": "Bearer sk-secret", "X-API-Key": "sk-other"},
    )
    assert r.status_code == 200
    (sent,) = front.fake.sent("/api/generate")
    assert not {"authorization", "x-api-key"} & sent.header_names()
    assert b"sk-" not in b"".join(v for _, v in sent.headers)


async def test_hop_by_hop_headers_are_dropped_both_ways(front: Front) -> None:
    """Connection-level request headers are not sent on, others are; the backend's own
    connection headers do not reach the client."""
    front.fake.script(
        A,
        Answer.json(
            GENERATED,
            headers=[("Connection", "close"), ("Server", "ollama"), ("X-Ollama-Note", "kept")],
        ),
    )
    r = await front.client.post(
        "/api/generate",
        json={"model": "m", "prompt": "hi", "stream": False},
        headers={
            "Connection": "keep-alive",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic eA==",
            "X-Priority": "high",
            "X-Custom": "passes",
        },
    )
    assert r.status_code == 200
    (sent,) = front.fake.sent("/api/generate")
    names = sent.header_names()
    assert names & {k.decode() for k in HOP_BY_HOP} == {"x-request-id"}
    assert sent.header("x-custom") == "passes"
    assert sent.header("content-type") == "application/json"
    assert "server" not in r.headers
    assert "connection" not in r.headers
    assert r.headers["x-ollama-note"] == "kept"


async def test_missing_model_in_openai_shape(front: Front) -> None:
    """A /v1 request without a model: 400 "model is required" as OpenAI's error object."""
    r = await front.client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "model is required"
    assert front.fake.sent() == []


async def test_backend_error_before_the_first_byte_keeps_its_shape(front: Front) -> None:
    """A backend that cannot be reached (the only one): 502 in Ollama's shape, with the id."""
    front.fake.script(A, UpstreamConnectError("connection refused"))
    r = await front.client.post(
        "/api/generate",
        json={"model": "m", "prompt": "hi", "stream": False},
        headers={"X-Request-ID": "req-7"},
    )
    assert r.status_code == 502
    assert r.json() == {"error": "backend a unreachable: connection refused"}
    assert r.headers["x-request-id"] == "req-7"
    assert json.loads(front.fake.sent("/api/generate")[0].body or b"{}")["model"] == "m"


async def test_headers_the_connection_header_names_are_not_forwarded(front: Front) -> None:
    """``Connection: keep-alive, X-Hop-Secret`` makes X-Hop-Secret a header of the client's
    connection alone (RFC 9110 §7.6.1): the backend does not get it."""
    front.fake.script(A, Answer.json(GENERATED))
    r = await front.client.post(
        "/api/generate",
        json={"model": "m", "prompt": "hi", "stream": False},
        headers=[
            ("Connection", "keep-alive, X-Hop-Secret"),
            ("Connection", "x-other-hop"),
            ("X-Hop-Secret", "mine"),
            ("X-Other-Hop", "mine too"),
            ("X-Custom", "passes"),
        ],
    )
    assert r.status_code == 200
    (sent,) = front.fake.sent("/api/generate")
    assert sent.header("x-hop-secret") is None
    assert sent.header("x-other-hop") is None
    assert sent.header("x-custom") == "passes"


async def test_the_backend_header_can_be_turned_off() -> None:
    """server.expose_backend_header = false: no answer names the backend that served it."""
    fake = FakeTransport().ollama(A, "m")
    settings = offline_settings("a", server={"expose_backend_header": False})
    app = create_app(
        settings, upstream=Upstream(settings.timeouts, transport=fake), gpu_sampler=NullSampler()
    )
    fake.script(A, Answer.json(GENERATED))
    async with asgi_client(app) as client:
        served = await client.post(
            "/api/generate", json={"model": "m", "prompt": "hi", "stream": False}
        )
        listed = await client.get("/api/tags")
        missing = await client.post("/api/generate", json={"model": "nope", "prompt": "hi"})
    assert served.status_code == 200
    assert listed.status_code == 200
    assert missing.status_code == 404
    for r in (served, listed, missing):
        assert "x-corral-backend" not in r.headers
        assert r.headers["x-request-id"]
