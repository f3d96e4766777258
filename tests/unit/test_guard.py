"""The edge guard on its own: Host, Origin and cross-site verdicts, forwarded clients, the
``corral.local`` verdict and the refusals' shapes, around a recording app (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral.config import ServerSettings
from corral.guard import EdgeGuard, host_name, is_loopback_name
from corral.metrics import Metrics

Headers = list[tuple[bytes, bytes]]


class Recorder:
    """The app behind the guard: remembers the scope it was handed and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[Any] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def guard(**server: Any) -> tuple[EdgeGuard, Recorder, Metrics]:
    bind = server.pop("host", "127.0.0.1")
    management = server.pop("management", True)
    inner, metrics = Recorder(), Metrics()
    settings = ServerSettings(host=bind, **server)
    edge = EdgeGuard(inner, settings, metrics, bind_host=bind, management=management)
    return edge, inner, metrics


async def call(
    edge: EdgeGuard,
    path: str = "/api/tags",
    headers: dict[str, str] | Headers | None = None,
    *,
    host: str | None = "127.0.0.1:11434",
    client: tuple[str, int] | None = ("127.0.0.1", 50000),
    server: tuple[str, int] | None = None,
    method: str = "GET",
) -> tuple[int, Any]:
    """One request through ``edge``: (status, JSON body or None)."""
    raw: Headers = []
    if host is not None:
        raw.append((b"host", host.encode()))
    items = headers.items() if isinstance(headers, dict) else []
    raw += [(k.lower().encode(), v.encode()) for k, v in items]
    if isinstance(headers, list):
        raw += headers
    scope = {"type": "http", "method": method, "path": path, "headers": raw, "client": client}
    if server is not None:
        scope["server"] = server
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    await edge(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], json.loads(body) if body else None


def refusals(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("corral_edge_refusals_total", {"reason": reason})
    return value or 0.0


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("LocalHost:11434", "localhost"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("corral.example.com.:80", "corral.example.com"),
        ("::1", "::1"),  # unbracketed IPv6: no port to strip
    ],
)
def test_host_names(value: str, name: str) -> None:
    assert host_name(value) == name


def test_loopback_names() -> None:
    for name in ("localhost", "app.localhost", "127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        assert is_loopback_name(name), name
    for name in ("localhost.attacker.example", "10.0.0.1", "0.0.0.0", "example.com", ""):
        assert not is_loopback_name(name), name


@pytest.mark.parametrize(
    "host", ["localhost:11434", "127.0.0.1:11434", "[::1]:11434", "ui.localhost", "LOCALHOST"]
)
async def test_bound_to_loopback_loopback_hosts_pass(host: str) -> None:
    """Loopback names and addresses, with any port, pass; the caller is local."""
    edge, inner, _ = guard()
    assert (await call(edge, host=host))[0] == 200
    assert inner.scopes[-1]["corral.local"] is True


async def test_bound_to_loopback_a_foreign_host_is_refused_everywhere() -> None:
    """DNS rebinding: a name that is not loopback's gets 403 before any route, and is counted."""
    edge, inner, metrics = guard()
    for path in ("/api/tags", "/", "/api/v1/loadbalancer/strategy", "/metrics", "/api/pull"):
        status, _ = await call(edge, path, host="rebind.attacker.example:11434")
        assert status == 403, path
    assert inner.scopes == []
    assert refusals(metrics, "host") == 5


async def test_allowed_hosts_admit_names_and_wildcards() -> None:
    """server.allowed_hosts: exact names (any port, or one port), "*.domain" for subdomains."""
    edge, _, _ = guard(allowed_hosts=["corral.lan", "*.example.com", "gpu.box:8080"])
    for host, status in [
        ("corral.lan:11434", 200),
        ("CORRAL.LAN", 200),
        ("a.example.com", 200),
        ("example.com", 403),
        ("gpu.box:8080", 200),
        ("gpu.box:9090", 403),
        ("evil.lan", 403),
    ]:
        assert (await call(edge, host=host))[0] == status, host


async def test_a_listed_host_is_not_local() -> None:
    """A listed name passes the Host check, but the keyless admin rule wants a loopback Host."""
    edge, inner, _ = guard(allowed_hosts=["corral.lan"])
    await call(edge, host="corral.lan")
    assert inner.scopes[-1]["corral.local"] is False


async def test_no_host_header_is_loopback_only_on_a_loopback_socket() -> None:
    """HTTP/1.0 without Host: the socket's address stands for it. Bound elsewhere with
    allowed_hosts set, a request that came in on another address is refused."""
    edge, inner, _ = guard()
    assert (await call(edge, host=None))[0] == 200
    assert inner.scopes[-1]["corral.local"] is True
    edge, inner, _ = guard(host="0.0.0.0", allowed_hosts=["corral.lan"])
    remote = ("203.0.113.5", 1)
    assert (await call(edge, host=None, client=remote, server=("10.0.0.5", 11434)))[0] == 403
    assert (await call(edge, host=None, client=remote))[0] == 403  # no server: the peer's
    assert (await call(edge, host=None, server=("127.0.0.1", 11434)))[0] == 200
    assert inner.scopes[-1]["corral.local"] is True
    assert (await call(edge, host=None, client=remote, server=("127.0.0.1", 11434)))[0] == 200
    assert inner.scopes[-1]["corral.local"] is False


async def test_bound_elsewhere_any_host_but_only_loopback_hosts_are_local() -> None:
    edge, inner, _ = guard(host="0.0.0.0")
    assert (await call(edge, host="anything.example:11434"))[0] == 200
    assert inner.scopes[-1]["corral.local"] is False
    assert (await call(edge, host="localhost:11434"))[0] == 200
    assert inner.scopes[-1]["corral.local"] is True
    # A remote peer is never local, whatever Host it names.
    await call(edge, host="localhost", client=("10.1.2.3", 5))
    assert inner.scopes[-1]["corral.local"] is False


async def test_bound_to_a_private_address_private_hosts_pass_with_allowed_hosts() -> None:
    edge, _, _ = guard(host="10.0.0.5", allowed_hosts=["corral.lan"])
    for host, status in [
        ("10.0.0.5:11434", 200),
        ("192.168.1.9", 200),
        ("localhost", 200),
        ("8.8.8.8", 403),
        ("rebind.attacker.example", 403),
    ]:
        assert (await call(edge, host=host, client=("10.0.0.9", 1)))[0] == status, host


async def test_bound_to_loopback_a_foreign_origin_is_refused_on_every_route() -> None:
    edge, _, metrics = guard()
    evil = {"Origin": "https://evil.example"}
    assert (await call(edge, "/api/tags", evil))[0] == 403
    assert (await call(edge, "/api/chat", evil, method="POST"))[0] == 403
    assert refusals(metrics, "origin") == 2
    for origin in (
        "http://localhost:3000",
        "http://127.0.0.1:8080",
        "http://[::1]:5173",
        "https://app.localhost",
        "http://0.0.0.0:8000",
        "vscode-webview://abc",
        "app://obsidian.md",
        "http://127.0.0.1:11434",  # the page's own origin
    ):
        assert (await call(edge, "/api/tags", {"Origin": origin}))[0] == 200, origin
    # Not an origin any browser sends: foreign, however much loopback it names.
    assert (await call(edge, "/api/tags", {"Origin": "http://127.0.0.1@evil.example"}))[0] == 403
    assert (await call(edge, "/api/tags", {"Origin": "null"}))[0] == 403


async def test_allowed_origins_admit_exact_and_wildcard_origins() -> None:
    """server.allowed_origins in OLLAMA_ORIGINS' syntax."""
    edge, _, _ = guard(allowed_origins=["https://chat.example.com", "https://*.corp.example"])
    for origin, status in [
        ("https://chat.example.com", 200),
        ("https://a.corp.example", 200),
        ("http://a.corp.example", 403),
        ("https://chat.example.com.evil", 403),
    ]:
        assert (await call(edge, "/api/tags", {"Origin": origin}))[0] == status, origin
        admin = "/api/v1/loadbalancer/strategy"
        assert (await call(edge, admin, {"Origin": origin}))[0] == status, origin


async def test_a_bare_star_opens_inference_but_not_admin_or_management() -> None:
    edge, _, _ = guard(allowed_origins=["*"])
    evil = {"Origin": "https://evil.example"}
    assert (await call(edge, "/api/chat", evil, method="POST"))[0] == 200
    assert (await call(edge, "/api/pull", evil, method="POST"))[0] == 403
    assert (await call(edge, "/api/v1/loadbalancer/loads", evil))[0] == 403


async def test_bound_elsewhere_a_foreign_origin_is_refused_on_admin_and_management_only() -> None:
    edge, _, _ = guard(host="0.0.0.0")
    evil = {"Origin": "https://evil.example"}
    kw: dict[str, Any] = {"host": "gpu.lan:11434", "client": ("10.0.0.9", 1)}
    assert (await call(edge, "/api/chat", evil, method="POST", **kw))[0] == 200
    for path in (
        "/api/pull",
        "/api/copy",
        "/api/delete",
        "/api/blobs/sha256:00",
        "/api/v1/loadbalancer/strategy",
        "/api/me",
        "/api/user/keys/k",
    ):
        assert (await call(edge, path, evil, **kw))[0] == 403, path
    # The status page's own calls: same origin as the Host it was served from.
    own = {"Origin": "http://gpu.lan:11434"}
    assert (await call(edge, "/api/v1/loadbalancer/strategy", own, method="PUT", **kw))[0] == 200


async def test_cross_site_fetches_never_reach_admin_or_management() -> None:
    """Sec-Fetch-Site: cross-site is refused there even without an Origin (a navigation or
    an image), unless the origin is loopback or listed; inference does not care."""
    edge, _, metrics = guard(host="0.0.0.0", allowed_origins=["https://ops.example"])
    cross = {"Sec-Fetch-Site": "cross-site"}
    assert (await call(edge, "/api/v1/loadbalancer/loads", cross))[0] == 403
    assert (await call(edge, "/api/copy", cross, method="POST"))[0] == 403
    assert refusals(metrics, "cross_site") == 2
    assert (await call(edge, "/api/tags", cross))[0] == 200
    listed = {**cross, "Origin": "https://ops.example"}
    assert (await call(edge, "/api/v1/loadbalancer/loads", listed))[0] == 200
    local = {**cross, "Origin": "http://localhost:3000"}
    assert (await call(edge, "/api/v1/loadbalancer/loads", local))[0] == 200
    same_site = {"Sec-Fetch-Site": "same-site", "Origin": "https://other.example"}
    assert (await call(edge, "/api/pull", same_site, method="POST"))[0] == 403


async def test_refusals_answer_in_each_routes_shape() -> None:
    edge, _, _ = guard()
    foreign = "rebind.attacker.example"
    status, body = await call(edge, "/api/chat", host=foreign, method="POST")
    assert status == 403
    assert set(body) == {"error"}
    assert "host" in body["error"]
    _, body = await call(edge, "/v1/chat/completions", host=foreign, method="POST")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    _, body = await call(edge, "/v1/messages", host=foreign, method="POST")
    assert body["type"] == "error"
    assert body["error"]["type"] == "permission_error"
    _, body = await call(edge, "/api/v1/loadbalancer/strategy", host=foreign, method="PUT")
    assert set(body) == {"detail"}


async def test_a_relayed_loopback_request_is_not_local() -> None:
    """X-Forwarded-For, Forwarded or X-Real-IP on a loopback request: a proxy relayed it."""
    edge, inner, _ = guard()
    for name in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        value = "for=203.0.113.9" if name == "Forwarded" else "203.0.113.9"
        assert (await call(edge, headers={name: value}))[0] == 200
        scope = inner.scopes[-1]
        assert scope["corral.local"] is False, name
        assert scope["client"] == ("127.0.0.1", 50000), name  # no trusted proxy: unchanged


async def test_trusted_proxies_name_the_client() -> None:
    """From a trusted peer, the rightmost untrusted X-Forwarded-For address is the client."""
    edge, inner, _ = guard(trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    cases: list[tuple[Headers, str]] = [
        ([(b"x-forwarded-for", b"203.0.113.9")], "203.0.113.9"),
        # A spoofed first entry is ignored: the proxy appended what it saw.
        ([(b"x-forwarded-for", b"127.0.0.1, 198.51.100.4, 10.1.1.1")], "198.51.100.4"),
        (
            [(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"198.51.100.7:443")],
            "198.51.100.7",
        ),
        ([(b"forwarded", b'for="[2001:db8::17]:4711";proto=https, for=10.0.0.2')], "2001:db8::17"),
        ([(b"x-real-ip", b"192.0.2.60")], "192.0.2.60"),
        # Every hop trusted: the leftmost is the client.
        ([(b"x-forwarded-for", b"10.0.0.7, 10.0.0.8")], "10.0.0.7"),
    ]
    for headers, client in cases:
        await call(edge, headers=headers)
        scope = inner.scopes[-1]
        assert scope["client"] == (client, 0), headers
        assert scope["corral.peer"] == ("127.0.0.1", 50000)
        assert scope["corral.local"] is False
    # A name that is not an address leaves the client as it was (and still not local).
    await call(edge, headers=[(b"x-forwarded-for", b"unknown")])
    assert inner.scopes[-1]["client"] == ("127.0.0.1", 50000)


async def test_forwarding_headers_from_an_untrusted_peer_change_nothing() -> None:
    edge, inner, _ = guard(host="0.0.0.0", trusted_proxies=["10.0.0.1"])
    await call(edge, headers={"X-Forwarded-For": "127.0.0.1"}, client=("203.0.113.50", 7))
    scope = inner.scopes[-1]
    assert scope["client"] == ("203.0.113.50", 7)
    assert scope["corral.local"] is False
    assert "corral.peer" not in scope


async def test_management_on_the_main_port_with_an_admin_listener() -> None:
    """server.admin_port: pull, delete, blobs... answer 403 on the main port, in Ollama's shape."""
    edge, inner, _ = guard(management=False)
    for path in ("/api/pull", "/api/delete", "/api/blobs/sha256:ab", "/api/copy"):
        status, body = await call(edge, path, method="POST")
        assert status == 403
        assert "admin port" in body["error"]
    assert (await call(edge, "/api/chat", method="POST"))[0] == 200
    assert len(inner.scopes) == 1


async def test_verdict_caches_stay_bounded() -> None:
    edge, _, _ = guard(host="0.0.0.0")
    for n in range(3000):
        await call(edge, host=f"h{n}.example", headers={"Origin": f"https://o{n}.example"})
    assert len(edge._hosts) <= 1024
    assert len(edge._origins) <= 1024


async def test_other_scopes_pass_through() -> None:
    edge, inner, _ = guard()
    await edge({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert inner.scopes == [{"type": "lifespan"}]
