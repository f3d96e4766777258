"""The edge guard on a real corral: DNS rebinding, foreign origins, cross-site simple POSTs,
proxies in front, model management on the admin listener, /metrics and the schema behind
settings, the start-up warning, and the official clients still at home."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
import structlog.testing
import uvicorn

from corral.app import create_app
from corral.asgi import Receive, Scope, Send
from tests.helpers import CorralThread, asgi_client, free_port, make_settings, metric, poll

pytestmark = pytest.mark.integration

LB = "/api/v1/loadbalancer"
REBIND = "rebind.attacker.example"
ADMIN = "edge-admin-key-0001"
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture
def sim(sim_factory: Any) -> Any:
    return sim_factory(name="a")


@pytest.fixture
def corral(sim: Any, corral_factory: Any) -> Any:
    """corral with the default edge settings: 127.0.0.1, no keys."""
    return corral_factory([{"id": "gpu0", "url": sim.url}])


def names(sim: Any) -> set[str]:
    with httpx.Client() as client:
        return {m["name"] for m in client.get(sim.url + "/api/tags").json()["models"]}


def test_dns_rebinding_is_refused_in_each_routes_shape(corral: Any, sim: Any) -> None:
    """A foreign Host (a rebound name) reaches no route: the strategy stays, no backend is
    registered, no prompt is served; each refusal speaks its API's error shape."""
    foreign = {"Host": f"{REBIND}:{corral.port}"}
    with corral.client(headers=foreign) as c:
        r = c.put(f"{LB}/strategy", json={"strategy": "round_robin"})
        assert r.status_code == 403
        assert set(r.json()) == {"detail"}
        rogue = {"id": "rogue", "url": sim.url}
        assert c.post(f"{LB}/backends", json=rogue).status_code == 403
        r = c.post("/api/chat", json=CHAT)
        assert r.status_code == 403
        assert set(r.json()) == {"error"}
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 403
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = c.post("/v1/messages", json={**CHAT, "max_tokens": 8})
        assert r.status_code == 403
        assert r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "permission_error"
    with corral.client() as c:
        assert c.get(f"{LB}/strategy").json() == {"strategy": "least_connections"}
        assert [b["instance_id"] for b in c.get(f"{LB}/backends").json()["backends"]] == ["gpu0"]
        assert metric(c, 'corral_edge_refusals_total{reason="host"}') == 5


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_loopback_hosts_with_a_port_pass(corral: Any, host: str) -> None:
    with corral.client(headers={"Host": f"{host}:{corral.port}"}) as c:
        assert c.put(f"{LB}/strategy", json={"strategy": "round_robin"}).status_code == 200
        assert c.post("/api/chat", json=CHAT).status_code == 200


def test_allowed_hosts_admit_a_name_but_not_into_the_keyless_admin_api(
    sim: Any, corral_factory: Any
) -> None:
    """server.allowed_hosts lets a name through to inference; the keyless admin API still
    wants a loopback Host."""
    corral = corral_factory([{"id": "gpu0", "url": sim.url}], server={"allowed_hosts": ["gpu.lan"]})
    with corral.client(headers={"Host": f"gpu.lan:{corral.port}"}) as c:
        assert c.post("/api/chat", json=CHAT).status_code == 200
        r = c.get(f"{LB}/loads")
        assert r.status_code == 403
        assert "loopback" in r.json()["detail"]
    with corral.client(headers={"Host": f"{REBIND}:{corral.port}"}) as c:
        assert c.post("/api/chat", json=CHAT).status_code == 403


def test_a_foreign_origin_is_refused_and_allowed_origins_admit(
    sim: Any, corral_factory: Any
) -> None:
    corral = corral_factory([{"id": "gpu0", "url": sim.url}])
    with corral.client(headers={"Origin": "https://evil.example"}) as c:
        r = c.post("/api/chat", json=CHAT)
        assert (r.status_code, set(r.json())) == (403, {"error"})
        assert c.get(f"{LB}/loads").status_code == 403
    with corral.client(headers={"Origin": "http://localhost:3000"}) as c:
        assert c.post("/api/chat", json=CHAT).status_code == 200
    listed = corral_factory(
        [{"id": "gpu0", "url": sim.url}],
        server={"allowed_origins": ["https://chat.example.com"]},
    )
    with listed.client(headers={"Origin": "https://chat.example.com"}) as c:
        assert c.post("/api/chat", json=CHAT).status_code == 200
        assert c.get(f"{LB}/loads").status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/copy", b'{"source": "llama3.2", "destination": "stolen"}'),
        ("/api/pull", b'{"model": "tinyllama", "stream": false}'),
    ],
)
def test_cross_site_simple_posts_never_manage_models(
    corral: Any, sim: Any, path: str, body: bytes
) -> None:
    """A page elsewhere posting text/plain (no preflight) to keyless management: 403."""
    before = names(sim)
    with corral.client() as c:
        for headers in (
            {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "cross-site"},  # no Origin at all: still refused
            {"Origin": "https://evil.example"},
        ):
            r = c.post(path, content=body, headers={"Content-Type": "text/plain", **headers})
            assert r.status_code == 403, headers
            assert set(r.json()) == {"error"}
        assert metric(c, 'corral_edge_refusals_total{reason="cross_site"}') == 1
    assert names(sim) == before


def test_keyed_management_refuses_cross_site_too(sim: Any, monkeypatch: Any) -> None:
    """With an admin key set, a cross-site request carrying it is still refused."""
    monkeypatch.setenv("CORRAL_ADMIN_KEY", ADMIN)
    settings = make_settings([{"id": "gpu0", "url": sim.url}])
    with CorralThread(settings) as corral, corral.client(headers={"X-API-Key": ADMIN}) as c:
        cross = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
        copy = {"source": "llama3.2", "destination": "c2"}
        assert c.post("/api/copy", json=copy, headers=cross).status_code == 403
        assert c.post("/api/copy", json=copy).status_code == 200


def test_a_keyless_admin_call_relayed_by_a_local_proxy_is_refused(corral: Any) -> None:
    """nginx on the same host: every caller is loopback, but a forwarding header says a proxy
    relayed it, so the keyless admin API and model management refuse it."""
    with corral.client() as c:
        assert c.get(f"{LB}/loads").status_code == 200
        for name, value in (
            ("X-Forwarded-For", "203.0.113.9"),
            ("Forwarded", "for=203.0.113.9"),
            ("X-Real-IP", "203.0.113.9"),
        ):
            headers = {name: value}
            assert c.get(f"{LB}/loads", headers=headers).status_code == 403, name
            put = c.put(f"{LB}/strategy", json={"strategy": "round_robin"}, headers=headers)
            assert put.status_code == 403
            r = c.post("/api/pull", json={"model": "tinyllama"}, headers=headers)
            assert r.status_code == 403
            r = c.request("DELETE", "/api/delete", json={"model": "llama3.2"}, headers=headers)
            assert r.status_code == 403
        # Inference through the proxy is unaffected.
        assert c.post("/api/chat", json=CHAT, headers={"X-Forwarded-For": "1.2.3.4"}).is_success


async def test_trusted_proxies_make_the_forwarded_address_the_client(
    sim: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """From a trusted proxy the forwarded address is ``scope["client"]`` for everything behind
    the guard (the access log's remote_addr, the loopback rule); from another peer the header
    is ignored."""
    settings = make_settings(
        [{"id": "gpu0", "url": sim.url}], server={"trusted_proxies": ["127.0.0.1"]}
    )
    app = create_app(settings)
    seen: list[Any] = []
    inner = app.guard.app

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append(scope["client"])
        await inner(scope, receive, send)

    app.guard.app = spy
    async with asgi_client(app) as c:
        xff = {"X-Forwarded-For": "127.0.0.1, 198.51.100.4"}
        assert (await c.get(f"{LB}/loads", headers=xff)).status_code == 403
        assert (await c.post("/api/chat", json=CHAT, headers=xff)).status_code == 200
        assert seen == [("198.51.100.4", 0)] * 2
        assert "remote_addr=198.51.100.4" in capsys.readouterr().out
        seen.clear()
        transport = httpx.ASGITransport(app=app, client=("192.0.2.1", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as other:
            await other.get("/api/tags", headers={"X-Forwarded-For": "127.0.0.1"})
        assert seen == [("192.0.2.1", 4000)]


class AdminListener:
    """The admin listener as ``corral serve`` runs it: on corral's own loop, no lifespan."""

    def __init__(self, corral: CorralThread, port: int) -> None:
        assert corral.app.admin_api is not None
        config = uvicorn.Config(
            corral.app.admin_api,
            host="127.0.0.1",
            port=port,
            loop="none",
            http="httptools",
            lifespan="off",
            log_level="warning",
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        assert corral.loop is not None
        self.done = asyncio.run_coroutine_threadsafe(self.server.serve(), corral.loop)
        self.url = f"http://127.0.0.1:{port}"
        assert poll(lambda: self.server.started, 10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.done.result(10)


@pytest.fixture
def split(sim: Any) -> Iterator[tuple[CorralThread, AdminListener]]:
    """corral with server.admin_port: the main port and the admin listener."""
    settings = make_settings([{"id": "gpu0", "url": sim.url}], server={"admin_port": free_port()})
    assert settings.server.admin_port is not None
    with CorralThread(settings) as corral:
        admin = AdminListener(corral, settings.server.admin_port)
        try:
            yield corral, admin
        finally:
            admin.stop()


def test_model_management_follows_the_admin_listener(split: Any, sim: Any) -> None:
    """With server.admin_port, pull and delete answer 403 on the main port and are served,
    fanned out, on the admin listener."""
    corral, admin = split
    main_client = ollama.Client(host=corral.url)
    admin_client = ollama.Client(host=admin.url)
    try:
        with pytest.raises(ollama.ResponseError) as refused:
            main_client.pull("tinyllama")
        assert refused.value.status_code == 403
        assert "admin port" in refused.value.error
        with pytest.raises(ollama.ResponseError):
            main_client.delete("llama3.2")
        assert "tinyllama:latest" not in names(sim)
        assert admin_client.pull("tinyllama").status == "success"
        assert "tinyllama:latest" in names(sim)
        admin_client.delete("tinyllama")
        assert "tinyllama:latest" not in names(sim)
        assert main_client.generate(model="llama3.2", prompt="hi").done
    finally:
        main_client._client.close()
        admin_client._client.close()
    with httpx.Client(base_url=admin.url) as c:
        # The admin listener keeps the admin API; inference stays on the main port.
        assert c.get(f"{LB}/loads").status_code == 200
        assert c.post("/api/generate", json={"model": "llama3.2", "prompt": "x"}).status_code == 404
        assert c.get(f"{LB}/loads", headers={"Host": REBIND}).status_code == 403


def test_metrics_auth_needs_the_admin_key(sim: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("CORRAL_ADMIN_KEY", ADMIN)
    settings = make_settings([{"id": "gpu0", "url": sim.url}], server={"metrics_auth": True})
    with CorralThread(settings) as corral, corral.client() as c:
        r = c.get("/metrics")
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/metrics", headers={"X-API-Key": ADMIN}).status_code == 200
        r = c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200


def test_metrics_stay_open_by_default_even_with_keys(sim: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("CORRAL_ADMIN_KEY", ADMIN)
    settings = make_settings([{"id": "gpu0", "url": sim.url}])
    with CorralThread(settings) as corral, corral.client() as c:
        assert c.get("/metrics").status_code == 200


def test_docs_and_schema_are_off_by_default(corral: Any, sim: Any, corral_factory: Any) -> None:
    """No /docs, /redoc or /openapi.json unless server.docs; with it, the schema only: the
    pages FastAPI would serve load scripts from a public CDN."""
    with corral.client() as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 404, path
    docs = corral_factory([{"id": "gpu0", "url": sim.url}], server={"docs": True})
    with docs.client() as c:
        schema = c.get("/openapi.json").json()
        assert f"{LB}/strategy" in schema["paths"]
        assert c.get("/docs").status_code == 404
        page = c.get("/ui").text  # the status page loads nothing from elsewhere either
        assert "<script src" not in page
        assert "http://" not in page
        assert "https://" not in page


async def test_start_up_warns_once_when_open_beyond_loopback(monkeypatch: Any) -> None:
    """Bound beyond loopback with neither an admin key nor client keys: one warning line."""
    monkeypatch.delenv("CORRAL_ADMIN_KEY", raising=False)
    monkeypatch.delenv("CORRAL_CLIENT_KEYS", raising=False)
    backends = [{"id": "gpu0", "url": "http://127.0.0.1:9"}]
    cases = [({"host": "0.0.0.0"}, None, 1), ({}, None, 0), ({"host": "0.0.0.0"}, "key-0001", 0)]
    for server, client_keys, expected in cases:
        if client_keys:
            monkeypatch.setenv("CORRAL_CLIENT_KEYS", client_keys)
        app = create_app(make_settings(backends, server=server))
        with structlog.testing.capture_logs() as logs:
            async with asgi_client(app):
                pass
        warnings = [e for e in logs if e["event"] == "listening beyond loopback with no keys"]
        assert len(warnings) == expected, (server, logs)
        for line in warnings:
            assert line["log_level"] == "warning"
            assert line["listeners"] == [f"0.0.0.0:{app.runtime.settings.server.port}"]


def test_the_official_clients_still_work_against_a_default_corral(corral: Any) -> None:
    """ollama, openai and anthropic send Host: 127.0.0.1:PORT and no Origin: all served."""
    oc = ollama.Client(host=corral.url)
    try:
        assert oc.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}]).done
        assert "llama3.2:latest" in {m.model for m in oc.list().models}
    finally:
        oc._client.close()
    with openai.OpenAI(base_url=f"{corral.url}/v1", api_key="unused", max_retries=0) as oa:
        answer = oa.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content
    with anthropic.Anthropic(base_url=corral.url, api_key="unused", max_retries=0) as an:
        message = an.messages.create(
            model="llama3.2", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content


def test_allowed_origins_get_cors_answers_as_ollama_gives_them(corral: Any) -> None:
    """A page on a loopback origin, a browser extension and a listed origin can call corral
    from a browser as they call Ollama: their preflight is answered 204 with the methods and
    the headers they ask for, and answers carry Access-Control-Allow-Origin. A foreign origin
    gets neither; a request without Origin gets no CORS headers."""
    page = "http://localhost:3000"
    with corral.client() as c:
        pre = c.options(
            "/v1/chat/completions",
            headers={
                "Origin": page,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            },
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == page
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert pre.headers["access-control-allow-headers"] == (
            "authorization, content-type, x-stainless-os"
        )
        for origin in (page, "chrome-extension://abcdefghijklmnop"):
            r = c.post("/api/chat", json=CHAT, headers={"Origin": origin})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == origin
            assert "X-Corral-Backend" in r.headers["access-control-expose-headers"]
        plain = c.post("/api/chat", json=CHAT)
        assert "access-control-allow-origin" not in plain.headers
        foreign = c.options(
            "/api/chat",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert foreign.status_code == 403
        assert "access-control-allow-origin" not in foreign.headers


def test_a_listed_origin_gets_cors_on_inference(sim: Any, corral_factory: Any) -> None:
    corral = corral_factory(
        [{"id": "gpu0", "url": sim.url}], server={"allowed_origins": ["https://app.example.com"]}
    )
    with corral.client() as c:
        r = c.post("/api/chat", json=CHAT, headers={"Origin": "https://app.example.com"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
