"""The edge guard: one pure-ASGI layer in front of everything a corral listener serves.

Once per request, before any route sees it, it decides three things (README "Defaults at the
edge"):

- **Host** (DNS rebinding, as Ollama's own check, CVE-2024-28224). Bound to loopback, a
  ``Host`` must be a loopback name or address (``localhost``, ``*.localhost``, ``127.x``,
  ``::1``, any port) or match ``server.allowed_hosts``; anything else is 403 on every route.
  Bound to another address any ``Host`` is accepted unless ``allowed_hosts`` is set; then
  loopback names, the bound address itself and (bound to a private or unspecified address)
  private addresses are accepted besides the list. A request with no ``Host`` (HTTP/1.0) has a
  loopback host only when the socket it came in on is loopback.
- **Origin** (cross-site requests from a browser). A foreign ``Origin`` is 403 on admin and
  management routes, and on every route while bound to loopback. Not foreign: loopback
  origins, the non-web app schemes Ollama trusts by default (``app://``, ``file://``,
  ``tauri://``, ``vscode-webview://``, ``vscode-file://``), the request's own origin (its
  authority equals ``Host``, which passed the check above) and ``server.allowed_origins``
  (OLLAMA_ORIGINS' syntax: exact origins, one ``*`` wildcard each, ``*`` for all). On admin and
  management routes a bare ``*`` vouches for nobody, and ``Sec-Fetch-Site: cross-site`` is
  refused unless the origin is loopback or listed: a simple ``text/plain`` POST needs no
  preflight, so CORS alone stops nothing there.
- **Who the client is.** A request carrying ``X-Forwarded-For``, ``Forwarded`` or
  ``X-Real-IP`` was relayed by a proxy. When its TCP peer is in ``server.trusted_proxies``
  the client address is taken from those headers (the rightmost address in
  ``X-Forwarded-For`` that is not a trusted proxy, else RFC 7239 ``for=``, else
  ``X-Real-IP``) and written into ``scope["client"]``, so logs, limits and the loopback rule
  see the real client; from any other peer the headers name nobody. Either way a relayed
  request is never *local*: ``scope["corral.local"]`` (read by :func:`corral.auth.admin_refusal`)
  is True only for a loopback peer, with a loopback ``Host``, and no forwarding header. That is
  what the keyless admin and model-management rule ("loopback callers only") requires, so a
  reverse proxy on the same host does not open it to everyone behind the proxy.

With ``server.admin_port`` the main listener answers model management (pull, push, create,
copy, delete, blobs) with 403: those routes are served by the admin listener only.

Refusals answer in the route's own error shape and count in ``corral_edge_refusals{reason}``.
The check costs a few microseconds: the allowed sets are built once, and verdicts per
``Host``, ``Origin`` and peer value are kept in small bounded dicts.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Final

from corral.asgi import ASGIApp, Receive, Scope, Send, request_id
from corral.config import ServerSettings
from corral.metrics import Metrics
from corral.proxy.front import MANAGEMENT, shape_of
from corral.proxy.passthrough import ACCOUNT, ACCOUNT_PREFIX
from corral.proxy.relay import JSON, send_bytes
from corral.shapes import error_body

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ADMIN_PREFIX: Final = "/api/v1/loadbalancer"
BLOBS_PREFIX: Final = "/api/blobs/"
# Paths whose keyless use is for loopback callers only: the admin API, model management and
# the account routes. Cross-site requests never reach them.
_SENSITIVE_PATHS = frozenset({*MANAGEMENT, *ACCOUNT})
_SENSITIVE_PREFIXES = (ADMIN_PREFIX + "/", BLOBS_PREFIX, ACCOUNT_PREFIX)
# Origins Ollama accepts by default besides loopback ones: desktop apps, editor webviews and
# browser extensions (its CORS layer allows them), never a page a remote site can serve.
_APP_SCHEMES = (
    "app://",
    "file://",
    "tauri://",
    "vscode-webview://",
    "vscode-file://",
    "chrome-extension://",
    "moz-extension://",
    "safari-extension://",
    "ms-browser-extension://",
)
# CORS, as Ollama answers it for the origins it allows (gin-contrib/cors' defaults).
_CORS_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
_CORS_MAX_AGE = b"43200"
_CORS_EXPOSE = b"X-Corral-Backend, X-Request-ID, Retry-After"
_CACHE_MAX = 1024  # distinct Host / Origin / peer values remembered (then forgotten at once)

# Origin verdicts.
FOREIGN, WILDCARD, TRUSTED = 0, 1, 2  # TRUSTED: loopback, an app scheme, or listed by pattern

MANAGEMENT_ELSEWHERE = "model management is served on the admin port (server.admin_port)"


def is_management(path: str) -> bool:
    """Fan-out model management: pull, push, create, copy, delete and blob uploads."""
    return path in MANAGEMENT or path.startswith(BLOBS_PREFIX)


def is_sensitive(path: str) -> bool:
    """Admin API, model management or account routes: what no cross-site request may reach."""
    return path in _SENSITIVE_PATHS or path == ADMIN_PREFIX or path.startswith(_SENSITIVE_PREFIXES)


def host_name(value: str) -> str:
    """The host part of a ``Host`` header (or an origin's authority), lower-case, without
    port, brackets or a trailing dot."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else text
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.removesuffix(".")


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_name(name: str) -> bool:
    """``localhost``, a ``*.localhost`` name (RFC 6761), or a loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = _address(name)
    return address is not None and address.is_loopback


def _patterns(items: list[str]) -> tuple[frozenset[str], list[tuple[str, str]], bool]:
    """Exact entries, (prefix, suffix) pairs of one-``*`` entries, and whether ``*`` is listed."""
    exact: set[str] = set()
    wild: list[tuple[str, str]] = []
    anything = False
    for item in items:
        if item == "*":
            anything = True
        elif "*" in item:
            prefix, _, suffix = item.partition("*")
            wild.append((prefix, suffix))
        else:
            exact.add(item)
    return frozenset(exact), wild, anything


def _matches(value: str, exact: frozenset[str], wild: list[tuple[str, str]]) -> bool:
    if value in exact:
        return True
    return any(
        len(value) >= len(p) + len(s) and value.startswith(p) and value.endswith(s) for p, s in wild
    )


class EdgeGuard:
    """Pure-ASGI layer: Host, Origin and cross-site checks, forwarded-for clients, and the
    ``corral.local`` verdict, once per request; then ``app``.

    ``bind_host`` is the address the listener is bound to; ``management=False`` makes model
    management a 403 here (the main port when ``server.admin_port`` is set).
    """

    def __init__(
        self,
        app: ASGIApp,
        server: ServerSettings,
        metrics: Metrics,
        *,
        bind_host: str,
        management: bool = True,
    ) -> None:
        self.app = app
        self.management = management
        self.loopback_bound = is_loopback_name(host_name(bind_host))
        bound = _address(host_name(bind_host))
        self._bound = bound
        self._private_bound = bound is not None and (bound.is_private or bound.is_unspecified)
        self._check_hosts = self.loopback_bound or bool(server.allowed_hosts)
        self._host_exact, self._host_wild, self._host_any = _patterns(server.allowed_hosts)
        self._origin_exact, self._origin_wild, self._origin_any = _patterns(server.allowed_origins)
        self._trusted: list[IPNetwork] = server.trusted_networks()
        self._hosts: dict[bytes | None, tuple[bool, bool]] = {}  # Host -> (allowed, loopback)
        self._origins: dict[bytes, int] = {}
        self._peers: dict[str, tuple[bool, bool]] = {}  # peer -> (loopback, trusted proxy)
        refusals = metrics.edge_refusals
        self._refused = {
            reason: refusals.labels(reason=reason) for reason in ("host", "origin", "cross_site")
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = origin = fetch_site = None
        relayed = False
        for key, value in scope["headers"]:
            if key == b"host":
                if host is None:
                    host = value
            elif key == b"origin":
                if origin is None:
                    origin = value
            elif key == b"sec-fetch-site":
                fetch_site = value
            elif key in (b"x-forwarded-for", b"forwarded", b"x-real-ip"):
                relayed = True
        peer = scope.get("client")
        peer_loopback, peer_trusted = self._peer(peer[0] if peer else None)
        if not host:
            host = None
        verdict = self._hosts.get(host)
        if verdict is None:
            verdict = self._host_verdict(host, scope, peer_loopback)
        allowed, loopback_host = verdict
        path: str = scope["path"]
        if not allowed:
            await self._refuse(scope, send, "host", "host not allowed")
            return
        sensitive = is_sensitive(path)
        kind = FOREIGN
        if origin is not None and (sensitive or self.loopback_bound):
            kind = self._origins.get(origin, -1)
            if kind < 0:
                kind = self._origin_verdict(origin)
            # Not refused: the page's own origin (its authority is the Host checked above).
            if (
                kind != TRUSTED
                and not (kind == WILDCARD and not sensitive)
                and (host is None or not _same_authority(origin, host))
            ):
                await self._refuse(scope, send, "origin", "origin not allowed")
                return
        if sensitive and fetch_site == b"cross-site" and kind != TRUSTED:
            await self._refuse(scope, send, "cross_site", "cross-site request refused")
            return
        if origin is not None:
            # An allowed origin (not refused above) gets CORS answers, as Ollama gives them.
            if kind == FOREIGN and not (sensitive or self.loopback_bound):
                kind = self._origins.get(origin, -1)
                if kind < 0:
                    kind = self._origin_verdict(origin)
            if kind != FOREIGN or (host is not None and _same_authority(origin, host)):
                preflight = _header(scope, b"access-control-request-method")
                if scope["method"] == "OPTIONS" and preflight:
                    await _preflight(scope, send, origin)
                    return
                send = _with_cors(send, origin)
        if not self.management and is_management(path):
            await refuse(scope, send, MANAGEMENT_ELSEWHERE)
            return
        if relayed and peer_trusted:
            client = self.forwarded_client(scope["headers"])
            if client is not None:
                scope["corral.peer"] = peer
                scope["client"] = (client, 0)
        scope["corral.local"] = peer_loopback and loopback_host and not relayed
        await self.app(scope, receive, send)

    # Verdicts, computed once per distinct value ---------------------------------------------

    def _peer(self, address: str | None) -> tuple[bool, bool]:
        """(loopback, a trusted proxy) for a TCP peer; no address (a Unix socket) is local."""
        if address is None:
            return True, False
        found = self._peers.get(address)
        if found is None:
            parsed = _address(address)
            found = (
                parsed is not None and parsed.is_loopback,
                parsed is not None and self._is_trusted(parsed),
            )
            self._remember(self._peers, address, found)
        return found

    def _host_verdict(
        self, host: bytes | None, scope: Scope, peer_loopback: bool
    ) -> tuple[bool, bool]:
        if host is None:
            # HTTP/1.0: the socket's own address stands for the Host (the peer's when the
            # server does not say). Not cached: it depends on the connection.
            server = scope.get("server")
            loopback = is_loopback_name(server[0]) if server else peer_loopback
            return not self._check_hosts or loopback or self._host_any, loopback
        text = host.decode("latin-1").strip().lower()
        name = host_name(text)
        loopback = is_loopback_name(name)
        allowed = loopback or not self._check_hosts or self._host_any
        if not allowed:
            allowed = _matches(name, self._host_exact, self._host_wild) or (
                text in self._host_exact
            )
        if not allowed and not self.loopback_bound:
            address = _address(name)
            allowed = address is not None and (
                address == self._bound or (self._private_bound and address.is_private)
            )
        verdict = allowed, loopback
        self._remember(self._hosts, host, verdict)
        return verdict

    def _origin_verdict(self, origin: bytes) -> int:
        text = origin.decode("latin-1").strip().lower()
        scheme, sep, authority = text.partition("://")
        # An origin is scheme://host[:port]: anything more is no browser's, and foreign.
        plain = not any(c in authority for c in "@/?#\\")
        name = host_name(authority)
        kind = FOREIGN
        # Ollama's default list has 0.0.0.0 beside the loopback names.
        if (
            (
                sep
                and scheme in ("http", "https")
                and plain
                and (is_loopback_name(name) or name == "0.0.0.0")
            )
            or text.startswith(_APP_SCHEMES)
            or _matches(text, self._origin_exact, self._origin_wild)
        ):
            kind = TRUSTED
        elif self._origin_any:
            kind = WILDCARD
        self._remember(self._origins, origin, kind)
        return kind

    @staticmethod
    def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
        if len(cache) >= _CACHE_MAX:
            cache.clear()  # a flood of distinct values costs a recomputation, never memory
        cache[key] = value

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    # Forwarded clients ----------------------------------------------------------------------

    def forwarded_client(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The client a trusted proxy names: the rightmost address that is not a trusted
        proxy in ``X-Forwarded-For`` (all of them lines, in order), else in ``Forwarded``'s
        ``for=``, else ``X-Real-IP``; the leftmost when every hop is trusted. None when the
        chosen entry is not an address (``unknown``, an obfuscated name)."""
        chains: dict[bytes, list[str]] = {}
        for key, value in headers:
            if key in (b"x-forwarded-for", b"forwarded", b"x-real-ip"):
                chains.setdefault(key, []).extend(_hops(key, value.decode("latin-1")))
        chain = chains.get(b"x-forwarded-for") or chains.get(b"forwarded")
        if not chain:
            chain = chains.get(b"x-real-ip", [])[-1:]
        address = None
        for hop in reversed(chain):
            address = _address(host_name(hop))
            if address is None:
                return None
            if not self._is_trusted(address):
                return str(address)
        return str(address) if address is not None else None

    async def _refuse(self, scope: Scope, send: Send, reason: str, message: str) -> None:
        self._refused[reason].inc()
        await refuse(scope, send, f"{message} (see server.allowed_{_WHICH[reason]})")


_WHICH = {"host": "hosts", "origin": "origins", "cross_site": "origins"}


def _hops(key: bytes, value: str) -> list[str]:
    """The addresses one forwarding header lists, in order (strings, possibly with ports)."""
    if key != b"forwarded":
        return [part.strip() for part in value.split(",") if part.strip()]
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, sep, given = pair.strip().partition("=")
            if sep and name.strip().lower() == "for":
                hops.append(given.strip().strip('"'))
    return hops


async def refuse(scope: Scope, send: Send, message: str, status: int = 403) -> None:
    """A refusal in the route's own shape: ``{"detail"}`` on the admin API and FastAPI's
    pages, else Ollama's, OpenAI's or Anthropic's error object; with an ``X-Request-ID``."""
    path: str = scope["path"]
    if path.startswith((ADMIN_PREFIX, "/ui")) or path in _FASTAPI_PATHS:
        body = json.dumps({"detail": message}, separators=(",", ":")).encode()
    else:
        body = error_body(message, shape=shape_of(path), status=status)
    headers = [JSON, (b"x-request-id", request_id(scope).encode())]
    await send_bytes(send, status, body, headers, head=scope["method"] == "HEAD")


_FASTAPI_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/docs", "/redoc", "/openapi.json"})

__all__ = [
    "EdgeGuard",
    "host_name",
    "is_loopback_name",
    "is_management",
    "is_sensitive",
    "refuse",
]


def _same_authority(origin: bytes, host: bytes) -> bool:
    """The page's own origin: its host[:port] is the request's ``Host``."""
    return origin.partition(b"://")[2].lower() == host.lower()


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


async def _preflight(scope: Scope, send: Send, origin: bytes) -> None:
    """A CORS preflight from an allowed origin: 204, the methods, the headers it asks for."""
    headers = [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", _CORS_METHODS),
        (b"access-control-max-age", _CORS_MAX_AGE),
        (b"vary", b"Origin"),
    ]
    asked = _header(scope, b"access-control-request-headers")
    if asked:
        headers.append((b"access-control-allow-headers", asked))
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _with_cors(send: Send, origin: bytes) -> Send:
    """``send`` with the CORS headers an allowed origin's page needs to read the answer."""

    async def sending(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = [
                *message.get("headers", ()),
                (b"access-control-allow-origin", origin),
                (b"access-control-expose-headers", _CORS_EXPOSE),
                (b"vary", b"Origin"),
            ]
            message = {**message, "headers": headers}
        await send(message)

    return sending
