"""Fleet-wide model management: pull, push, create, copy, delete and blobs fan out to backends."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from corral.app import create_app
from tests.helpers import free_port, make_settings, ndjson, poll

pytestmark = pytest.mark.integration

KEY = "s3cret-admin"


@pytest.fixture
def fleet(sim_factory: Any, corral_factory: Any) -> Any:
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}])
    return corral, a, b


@pytest.fixture
def oc(fleet: Any) -> Iterator[ollama.Client]:
    client = ollama.Client(host=fleet[0].url)
    yield client
    client._client.close()


def names(sim: Any) -> set[str]:
    """The models a simulator lists in /api/tags."""
    with httpx.Client() as client:
        return {m["name"] for m in client.get(sim.url + "/api/tags").json()["models"]}


def test_ollama_client_pull_lands_on_every_backend(fleet: Any, oc: ollama.Client) -> None:
    """ollama.Client.pull puts the model on every backend; corral lists and routes it at once."""
    corral, a, b = fleet
    assert oc.pull("gemma3:1b").status == "success"
    assert "gemma3:1b" in names(a)
    assert "gemma3:1b" in names(b)
    assert "gemma3:1b" in {m.model for m in oc.list().models}
    with corral.client() as client:
        r = client.post(
            "/api/generate", json={"model": "gemma3:1b", "prompt": "hi", "stream": False}
        )
        assert r.status_code == 200
        assert r.headers["x-corral-backend"] in {"a", "b"}


def test_streamed_pull_merges_every_backends_progress(
    sim_factory: Any, corral_factory: Any
) -> None:
    """stream: each backend's lines tagged with "backend", interleaved; then success lines."""
    a, b = sim_factory(name="a", pull_delay_s=0.02), sim_factory(name="b", pull_delay_s=0.02)
    corral = corral_factory([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}])
    with (
        corral.client() as client,
        client.stream("POST", "/api/pull", json={"model": "mistral"}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        assert r.headers["x-corral-backend"] == "a,b"
        got = ndjson(r)
    assert got[-1] == {"status": "success"}
    assert {"backend": "a", "status": "backend finished"} in got
    assert {"backend": "b", "status": "backend finished"} in got
    progress = got[:-3]
    assert all(line["backend"] in {"a", "b"} for line in progress)
    assert {"backend": "a", "status": "pulling manifest"} in progress
    assert any(line.get("digest") and line["backend"] == "b" for line in progress)
    order = [line["backend"] for line in progress]
    assert order.index("b") < len(order) - 1 - order[::-1].index("a"), "not interleaved"
    oc = ollama.Client(host=corral.url)
    try:
        parts = list(oc.pull("mistral", stream=True))
    finally:
        oc._client.close()
    assert parts[-1].status == "success"


def test_one_backend_failing_does_not_stop_the_others(fleet: Any, oc: ollama.Client) -> None:
    """b cannot pull: a still gets the model, b is named in the final line, the client raises."""
    corral, a, b = fleet
    b.app.sim.registry.pop("gemma3:1b")
    with (
        corral.client() as client,
        client.stream("POST", "/api/pull", json={"model": "gemma3:1b"}) as r,
    ):
        assert r.status_code == 200
        got = ndjson(r)
    assert {"backend": "a", "status": "backend finished"} in got
    assert {"backend": "b", "error": "pull model manifest: file does not exist"} in got
    assert got[-1]["failed"] == ["b"]
    assert "b: pull model manifest: file does not exist" in got[-1]["error"]
    assert "gemma3:1b" in names(a)
    assert "gemma3:1b" not in names(b)
    with pytest.raises(ollama.ResponseError) as info:
        oc.pull("gemma3:1b")
    assert info.value.status_code == 500  # Ollama's own status for a failed pull
    assert "b: pull model manifest" in info.value.error
    with corral.client() as client:
        r = client.post("/api/pull", json={"model": "gemma3:1b", "stream": False})
    assert r.status_code == 500
    assert r.json()["failed"] == ["b"]
    assert r.json()["backends"]["a"] == {"status": "success"}
    with pytest.raises(ollama.ResponseError):
        list(oc.pull("gemma3:1b", stream=True))


def test_backend_query_limits_the_fan_out(fleet: Any) -> None:
    """?backend=ID sends to that backend only; an unknown id is 404 in Ollama's shape."""
    corral, a, b = fleet
    with corral.client() as client:
        r = client.post("/api/pull?backend=b", json={"model": "tinyllama", "stream": False})
        assert r.status_code == 200
        assert r.json() == {"status": "success", "backends": {"b": {"status": "success"}}}
        assert "tinyllama:latest" in names(b)
        assert "tinyllama:latest" not in names(a)
        r = client.post("/api/pull?backend=x", json={"model": "tinyllama"})
        assert (r.status_code, r.json()) == (404, {"error": "unknown backend 'x'"})


def test_copy_and_delete_fan_out(fleet: Any, oc: ollama.Client) -> None:
    """copy and delete reach every backend and succeed where the model was; a model missing
    everywhere is Ollama's 404."""
    corral, a, b = fleet
    assert oc.copy("llama3.2", "mine").status == "success"
    assert "mine:latest" in names(a) & names(b)
    with corral.client() as client:
        r = client.post("/api/generate", json={"model": "mine", "prompt": "x", "stream": False})
        assert r.status_code == 200
        r = client.request("DELETE", "/api/delete", json={"model": "mine"})
        assert (r.status_code, r.content) == (200, b"")
        assert "mine:latest" not in names(a) | names(b)
        r = client.post("/api/generate", json={"model": "mine", "prompt": "x", "stream": False})
        assert r.status_code == 404
        r = client.request("DELETE", "/api/delete", json={"model": "mine"})
        assert r.status_code == 404
        assert r.json()["error"] == "model 'mine' not found"
        assert r.json()["failed"] == ["a", "b"]
        # On one backend only: deleted where it was, and that is success (b never had it).
        client.post("/api/copy?backend=a", json={"source": "llama3.2", "destination": "solo"})
        client.post("/api/copy", json={"source": "llama3.2", "destination": "both"})
        r = client.request("DELETE", "/api/delete", json={"model": "solo"})
        assert (r.status_code, r.content) == (200, b"")
        assert "solo:latest" not in names(a)
    with pytest.raises(ollama.ResponseError) as info:
        oc.copy("nope", "other")
    assert info.value.status_code == 404
    assert oc.delete("both").status == "success"


def test_blobs_and_create_fan_out(sim_factory: Any, corral_factory: Any, tmp_path: Path) -> None:
    """A blob bigger than max_body_mb streams to every backend; create from it works on all."""
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory(
        [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}], server={"max_body_mb": 0.5}
    )
    data = bytes(range(256)) * 12_000  # ~3 MB
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with corral.client() as client:
        assert client.head(f"/api/blobs/{digest}").status_code == 404
        r = client.post(f"/api/blobs/{digest}", content=iter([data[:1000], data[1000:]]))
        assert r.status_code == 201
        assert client.head(f"/api/blobs/{digest}").status_code == 200
        r = client.post(f"/api/blobs/{digest[:-4]}beef", content=data)
        assert r.status_code == 400
        assert r.json()["error"].startswith("digest mismatch")
        r = client.post("/api/blobs/sha256:123", content=data)
        assert (r.status_code, r.json()) == (400, {"error": "invalid digest format"})
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    oc = ollama.Client(host=corral.url)
    try:
        assert oc.create_blob(path) == digest  # already there: 200
        done = oc.create(model="local", files={"model.gguf": digest})
        assert done.status == "success"
        assert oc.push("local").status == "success"
    finally:
        oc._client.close()
    assert "local:latest" in names(a) & names(b)


def test_admin_key_guards_management(
    sim_factory: Any, corral_factory: Any, monkeypatch: Any
) -> None:
    """With an admin key set: no or wrong key is 401; X-API-Key or Bearer work."""
    monkeypatch.setenv("CORRAL_ADMIN_KEY", KEY)
    sim = sim_factory(name="a")
    corral = corral_factory([{"id": "a", "url": sim.url}])
    with corral.client() as client:
        r = client.post("/api/pull", json={"model": "tinyllama", "stream": False})
        assert (r.status_code, r.json()) == (401, {"error": "unauthorized"})
        r = client.request(
            "DELETE", "/api/delete", json={"model": "llama3.2"}, headers={"X-API-Key": "no"}
        )
        assert r.status_code == 401
        assert "llama3.2:latest" in names(sim)
        r = client.post(
            "/api/copy", json={"source": "llama3.2", "destination": "c"}, headers={"X-API-Key": KEY}
        )
        assert r.status_code == 200
    plain = ollama.Client(host=corral.url)
    admin = ollama.Client(host=corral.url, headers={"Authorization": f"Bearer {KEY}"})
    try:
        with pytest.raises(ollama.ResponseError) as info:
            plain.pull("tinyllama")
        assert info.value.status_code == 401
        assert plain.generate(model="llama3.2", prompt="hi").done  # inference needs no key
        assert admin.pull("tinyllama").status == "success"
    finally:
        plain._client.close()
        admin._client.close()


def test_clients_mode_needs_no_admin_key(
    sim_factory: Any, corral_factory: Any, monkeypatch: Any
) -> None:
    """auth.model_management = "clients": any client with a client key may pull, without the
    admin key; one without a key may not."""
    monkeypatch.setenv("CORRAL_ADMIN_KEY", KEY)
    monkeypatch.setenv("CORRAL_CLIENT_KEYS", "client-key-1")
    sim = sim_factory(name="a")
    corral = corral_factory([{"id": "a", "url": sim.url}], auth={"model_management": "clients"})
    oc = ollama.Client(host=corral.url, headers={"Authorization": "Bearer client-key-1"})
    anonymous = ollama.Client(host=corral.url)
    try:
        assert oc.pull("tinyllama").status == "success"
        with pytest.raises(ollama.ResponseError) as refused:
            anonymous.pull("tinyllama")
        assert refused.value.status_code == 401
    finally:
        oc._client.close()
        anonymous._client.close()


async def test_remote_caller_without_admin_key_is_403() -> None:
    """With no admin key configured, only loopback callers may manage models."""
    app = create_app(make_settings([{"id": "a", "url": "http://127.0.0.1:9"}]))
    for host, status in (("203.0.113.7", 403), ("127.0.0.1", 503)):
        transport = httpx.ASGITransport(app=app, client=(host, 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            r = await client.post("/api/pull", json={"model": "tinyllama"})
        assert r.status_code == status
        assert set(r.json()) == {"error"}


def test_bad_requests_keep_ollamas_shapes(fleet: Any) -> None:
    """Bad bodies are 400 {"error"} before anything reaches a backend; wrong method is 405."""
    corral, a, _ = fleet
    with corral.client() as client:
        for body in (b"", b"{nope", b"[1]", b'{"model": "x", "stream": "yes"}'):
            r = client.post("/api/pull", content=body)
            assert r.status_code == 400
            assert set(r.json()) == {"error"}
        assert a.stats()["by_route"].get("/api/pull") is None
        r = client.get("/api/pull")
        assert (r.status_code, r.text) == (405, "405 method not allowed")
        # Every backend refuses the name before streaming: a real status, as Ollama gives.
        r = client.post("/api/pull", json={"model": "bad name!"})
        assert r.status_code == 400
        assert r.json()["error"] == "invalid model name"
        assert r.json()["failed"] == ["a", "b"]


def test_no_healthy_backend_is_503(corral_factory: Any) -> None:
    """Nothing healthy to manage: 503 with Retry-After in Ollama's shape."""
    corral = corral_factory([{"id": "dead", "url": f"http://127.0.0.1:{free_port()}"}])
    with corral.client() as client:
        r = client.post("/api/pull", json={"model": "tinyllama"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json() == {"error": "no healthy backend available"}
        r = client.post("/api/pull?backend=dead", json={"model": "tinyllama"})
        assert (r.status_code, r.json()) == (503, {"error": "backend 'dead' is down"})
        assert r.headers["retry-after"] == "1"


def test_client_disconnect_cancels_every_pull(sim_factory: Any, corral_factory: Any) -> None:
    """A client gone mid-pull cancels the pull on every backend; nothing is half-installed."""
    a, b = sim_factory(name="a", pull_delay_s=0.2), sim_factory(name="b", pull_delay_s=0.2)
    corral = corral_factory([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}])
    with (
        corral.client() as client,
        client.stream("POST", "/api/pull", json={"model": "mistral"}) as r,
    ):
        first = json.loads(next(r.iter_lines()))
        assert first["backend"] in {"a", "b"}
    assert poll(lambda: a.stats()["cancelled"] == 1 and b.stats()["cancelled"] == 1, 5)
    assert "mistral:latest" not in names(a) | names(b)


def test_a_delete_missed_while_down_is_replayed_when_the_backend_returns(
    sim_factory: Any, corral_factory: Any
) -> None:
    """b crashes; a fleet delete names it as skipped; the models view and `corral models`
    show the delete b owes; b restarts still holding the model, and corral deletes it there
    instead of listing and serving it again."""
    from corral.cli.models import replays_table
    from corral.sim.harness import SimProcess

    a = sim_factory(name="a")
    b = SimProcess(name="b").start()
    try:
        corral = corral_factory([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}])
        model = "qwen2.5:7b"
        with corral.client() as client:

            def up(bid: str) -> bool:
                backends = client.get("/api/v1/loadbalancer/backends").json()["backends"]
                return next(e for e in backends if e["instance_id"] == bid)["healthy"]

            b.kill()
            assert poll(lambda: not up("b"), 10)
            gone = client.request("DELETE", "/api/delete", json={"model": model})
            assert (gone.status_code, gone.json()) == (200, {"skipped": ["b"]})
            assert model not in names(a)
            view = client.get("/api/v1/loadbalancer/models").json()
            [owed] = view["replays"]
            assert (owed["backend"], owed["action"], owed["model"]) == ("b", "delete", model)
            assert owed["reason"] == "down"
            printed = render_text(replays_table(view["replays"]))
            assert "b" in printed
            assert "delete" in printed
            assert model in printed

            b = SimProcess(name="b", port=b.port).start()  # back, with the model on disk
            assert poll(lambda: not client.get("/api/v1/loadbalancer/models").json()["replays"], 10)
            assert model not in names(b)
            assert model not in {m["name"] for m in client.get("/api/tags").json()["models"]}
            asked = client.post("/api/generate", json={"model": model, "prompt": "hi"})
            assert asked.status_code == 404
            assert "corral_model_replays_total" in client.get("/metrics").text
    finally:
        b.stop()


def render_text(table: Any) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_a_request_for_a_model_being_pulled_waits_for_it(
    sim_factory: Any, corral_factory: Any
) -> None:
    """While a fleet pull brings gemma3:1b, a chat for it waits (not Ollama's 404) and is
    answered once the model is there. (A pull that fails ends such waits with the 404:
    tests/unit/balancer/test_admission.py.)"""
    a = sim_factory(name="a", pull_delay_s=0.2)  # about 2 s of progress lines
    corral = corral_factory([{"id": "a", "url": a.url}])
    pulled: list[int] = []

    def pull() -> None:
        with corral.client() as puller:
            answer = puller.post("/api/pull", json={"model": "gemma3:1b", "stream": False})
            pulled.append(answer.status_code)

    worker = threading.Thread(target=pull)
    worker.start()
    try:
        assert poll(lambda: corral.call(lambda: "gemma3:1b" in corral.runtime.registry.coming), 5)
        with corral.client() as client:
            chat = client.post(
                "/api/chat",
                json={"model": "gemma3:1b", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
    finally:
        worker.join(30)
    assert pulled == [200]
    assert chat.status_code == 200, chat.text
    assert a.stats()["by_route"]["/api/chat"] == 1


GO_CLI = {
    "User-Agent": "ollama/0.33.0 (amd64 linux) Go/go1.24.6",
    "Content-Type": "application/json",
}


def test_ollama_push_as_the_ollama_cli_sends_it(fleet: Any) -> None:
    """`ollama push NAME` as the Go CLI (api/client.go) does it: `POST /api/me` to learn the
    signed-in user, then `POST /api/push` read line by line, failing at the first line with an
    `error`, to the end of the stream. Through a keyless corral on loopback it succeeds, and
    every backend pushed."""
    corral, a, b = fleet
    with corral.client() as client:
        me = client.post("/api/me", headers={**GO_CLI, "Accept": "application/json"})
        assert me.status_code == 200
        assert me.json()["name"] == "sim"
        body = {"model": "llama3.2", "insecure": False}
        headers = {**GO_CLI, "Accept": "application/x-ndjson"}
        with client.stream("POST", "/api/push", json=body, headers=headers) as pushed:
            assert pushed.status_code == 200
            seen = []
            for line in pushed.iter_lines():
                obj = json.loads(line)
                assert not obj.get("error"), obj
                seen.append(obj)
    assert seen[-1] == {"status": "success"}
    assert sorted(o["backend"] for o in seen if o.get("status") == "backend finished") == [
        "a",
        "b",
    ]
    assert a.stats()["by_route"]["/api/push"] == b.stats()["by_route"]["/api/push"] == 1
