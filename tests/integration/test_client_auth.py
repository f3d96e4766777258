"""Client keys over a real corral and simulator: 401s, the official clients with keys,
model management for the admin only, per-key priority and rate limits, keys never logged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from corral.config import load_config
from tests.helpers import CorralThread, free_port, metric, poll

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-key-0001"
TEAM = "team-a-secret-key-0002"
BATCH = "batch-secret-key-0003"
SLOW = "slow-secret-key-0004"
KEYS = f"{TEAM} name=team-a, {BATCH} name=batch priority=low\n{SLOW} name=slow rate=2"


@pytest.fixture
def secured(sim_factory: Any) -> Iterator[tuple[CorralThread, Any]]:
    sim = sim_factory(name="a", tokens=4)
    settings = load_config(
        None,
        overrides={
            "server": {"port": free_port(), "log_level": "info", "log_format": "console"},
            "health": {"interval_s": 0.2, "timeout_s": 1},
            "backends": [{"id": "a", "url": sim.url, "max_concurrent": 1}],
        },
        env={"CORRAL_ADMIN_KEY": ADMIN, "CORRAL_CLIENT_KEYS": KEYS},
    )
    with CorralThread(settings) as corral:
        yield corral, sim


def test_no_key_is_401_in_each_routes_shape(secured: Any) -> None:
    corral, _ = secured
    with httpx.Client(base_url=corral.url) as c:
        r = c.post("/api/generate", json={"model": "llama3.2", "prompt": "hi"})
        assert (r.status_code, r.json()) == (401, {"error": "missing API key"})
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/chat/completions", json={"model": "llama3.2", "messages": []})
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "missing API key"
        r = c.get("/api/tags", headers={"Authorization": "Bearer wrong-key-123"})
        assert (r.status_code, r.json()) == (401, {"error": "invalid API key"})
        assert c.get("/").status_code == 200  # liveness stays open
        assert c.get("/api/version").status_code == 200
        assert metric(c, 'corral_rejections_total{reason="unauthorized"}') == 3


def test_official_clients_work_with_a_key(secured: Any) -> None:
    corral, _ = secured
    client = ollama.Client(host=corral.url, headers={"Authorization": f"Bearer {TEAM}"})
    keyless = ollama.Client(host=corral.url)
    try:
        reply = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert reply.message.content
        assert [m.model for m in client.list().models]
        with pytest.raises(ollama.ResponseError) as err:
            keyless.chat(model="llama3.2", messages=[])
        assert err.value.status_code == 401
    finally:
        client._client.close()
        keyless._client.close()
    oa = openai.OpenAI(base_url=f"{corral.url}/v1", api_key=TEAM, max_retries=0)
    done = oa.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}]
    )
    assert done.choices[0].message.content
    oa.close()
    bad = openai.OpenAI(base_url=f"{corral.url}/v1", api_key="nope-nope-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad.close()


def test_a_client_key_cannot_pull_or_delete_the_admin_key_can(secured: Any) -> None:
    corral, sim = secured
    team = ollama.Client(host=corral.url, headers={"Authorization": f"Bearer {TEAM}"})
    admin = ollama.Client(host=corral.url, headers={"X-API-Key": ADMIN})
    try:
        for call in (lambda: team.pull("gemma3:1b"), lambda: team.delete("llama3.2")):
            with pytest.raises(ollama.ResponseError) as err:
                call()
            assert err.value.status_code == 401
        assert admin.pull("gemma3:1b").status == "success"
    finally:
        team._client.close()
        admin._client.close()
    with httpx.Client(base_url=sim.url) as direct:
        names = [m["name"] for m in direct.get("/api/tags").json()["models"]]
    assert "gemma3:1b" in names
    assert "llama3.2:latest" in names  # the client's delete did nothing


def test_key_priority_is_the_default_and_rate_limits_answer_429(secured: Any) -> None:
    corral, sim = secured
    sim.config.tokens = 200
    sim.config.token_interval_s = 0.01
    with (
        httpx.Client(base_url=corral.url, timeout=30) as c,
        c.stream(
            "POST",
            "/api/generate",
            json={"model": "llama3.2", "prompt": "long"},
            headers={"X-API-Key": TEAM},
        ) as busy,
    ):
        assert busy.status_code == 200  # holds the only slot
        t = threading.Thread(
            target=lambda: httpx.post(
                f"{corral.url}/api/generate",
                json={"model": "llama3.2", "prompt": "x", "stream": False},
                headers={"X-API-Key": BATCH},
                timeout=30,
            )
        )
        t.start()
        with httpx.Client(base_url=corral.url) as m:
            assert poll(lambda: metric(m, 'corral_queue_depth{priority="low"}') == 1, 5)
        for _ in busy.iter_lines():
            pass
    t.join(30)
    sim.config.tokens = 2
    with httpx.Client(base_url=corral.url, headers={"X-API-Key": SLOW}) as c:
        codes = [c.get("/api/tags").status_code for _ in range(4)]
        assert codes[:2] == [200, 200]
        assert 429 in codes[2:]
        r = c.get("/api/tags")
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json() == {"error": "rate limit of client key 'slow' exceeded"}


def test_keys_are_never_logged_but_names_are(
    secured: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    corral, _ = secured
    with httpx.Client(base_url=corral.url, headers={"Authorization": f"Bearer {TEAM}"}) as c:
        assert c.post("/api/generate", json={"model": "llama3.2", "stream": False}).status_code
    with httpx.Client(base_url=corral.url, headers={"X-API-Key": ADMIN}) as c:
        assert c.get("/api/v1/loadbalancer/loads").status_code == 200
    seen: list[str] = []

    def logged() -> bool:
        captured = capfd.readouterr()
        seen.extend((captured.out, captured.err))
        return "client=team-a" in "".join(seen)

    assert poll(logged, 3)  # the access log names the client...
    for key in (ADMIN, TEAM, BATCH, SLOW):
        assert key not in "".join(seen)  # ...and never shows a key


def test_anthropic_client_with_and_without_a_key(secured: Any) -> None:
    """The anthropic package sends its key as X-API-Key: a wrong one is a 401 in Anthropic's
    error shape (its AuthenticationError), a client key works."""
    corral, _ = secured
    body = {"model": "llama3.2", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    wrong = anthropic.Anthropic(base_url=corral.url, api_key="wrong-key-123", max_retries=0)
    try:
        with pytest.raises(anthropic.AuthenticationError) as info:
            wrong.messages.create(**body)
        assert info.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid API key"},
        }
    finally:
        wrong.close()
    right = anthropic.Anthropic(base_url=corral.url, api_key=TEAM)
    try:
        assert right.messages.create(**body).content
    finally:
        right.close()


def test_account_routes_need_the_admin_key_web_routes_a_client_key(secured: Any) -> None:
    """/api/me, /api/signout, /api/user/keys/{key} and /api/status act on the backend's
    ollama.com account: the admin key only; the experimental web routes take a client key;
    both answer as the backend does."""
    corral, sim = secured
    team = {"Authorization": f"Bearer {TEAM}"}
    admin = {"X-API-Key": ADMIN}
    with httpx.Client(base_url=corral.url) as c:
        for method, path in (
            ("POST", "/api/me"),
            ("POST", "/api/signout"),
            ("DELETE", "/api/user/keys/c3NoLWVkMjU1MTk"),
            ("GET", "/api/status"),
        ):
            assert c.request(method, path, headers=team).status_code == 401, path
            assert c.request(method, path).status_code == 401, path
        me = c.post("/api/me", headers=admin)
        assert (me.status_code, me.json()["name"]) == (200, "sim")
        assert me.headers["x-corral-backend"] == "a"
        assert c.get("/api/status", headers=admin).json() == {
            "cloud": {"disabled": False, "source": "default"}
        }
        assert c.delete("/api/user/keys/c3NoLWVkMjU1MTk", headers=admin).status_code == 200
        body = {"query": "what is ollama", "max_results": 2}
        assert c.post("/api/experimental/web_search", json=body).status_code == 401
        found = c.post("/api/experimental/web_search", json=body, headers=team)
        assert (found.status_code, found.json()) == (200, {"results": []})
        empty = c.post("/api/experimental/web_fetch", content=b" ", headers=team)
        assert (empty.status_code, empty.json()) == (400, {"error": "missing request body"})
        assert c.get("/api/experimental/model-recommendations", headers=team).status_code == 200
    stats = sim.stats()["by_route"]
    assert stats["/api/me"] == 1
    assert stats["/api/experimental/web_search"] == 1
