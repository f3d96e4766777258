"""Who may do what: the admin key (admin API, model management) and client keys (inference).

Keys are compared in constant time (the admin key with ``hmac.compare_digest``; client keys by
their SHA-256, looked up in a dict) and never logged: logs carry a client key's name only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corral.asgi import Headers, Scope, header


def is_loopback(host: str | None) -> bool:
    """A loopback address (an IPv4-mapped one too) or ``localhost``."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def admin_denial(
    key: str | None,
    api_key: str | None,
    authorization: str | None,
    client_host: str | None,
    *,
    local: bool | None = None,
) -> tuple[int, str] | None:
    """Why a caller may not use an admin-only route, as (status, message); None if it may.

    ``X-API-Key`` or an ``Authorization: Bearer`` token must equal ``key`` (constant-time
    comparison); with no key configured only local callers are let in. ``local`` is the edge
    guard's verdict (:mod:`corral.guard`: a loopback peer, a loopback ``Host`` and no proxy
    between); without one, a loopback ``client_host`` is local.
    """
    if key is None:
        if local if local is not None else is_loopback(client_host):
            return None
        return 403, "the admin API only answers loopback callers when no admin key is set"
    given = api_key
    if given is None and authorization:
        scheme, _, token = authorization.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if given is not None and hmac.compare_digest(given.encode(), key.encode()):
        return None
    return 401, "unauthorized"


def admin_refusal(key: str | None, scope: Scope) -> tuple[int, str, Headers] | None:
    """:func:`admin_denial` for an ASGI request: (status, message, headers to add), or None
    when the caller may use an admin-only route. Locality is the edge guard's
    ``scope["corral.local"]`` when it ran, else the peer's address."""
    client = scope.get("client")
    denied = admin_denial(
        key,
        header(scope, b"x-api-key"),
        header(scope, b"authorization"),
        client[0] if client else None,
        local=scope.get("corral.local"),
    )
    if denied is None:
        return None
    status, message = denied
    return status, message, [(b"www-authenticate", b"Bearer")] if status == 401 else []


# Client keys ------------------------------------------------------------------------------

PRIORITY_RANKS = {"low": 0, "normal": 1, "high": 2, "urgent": 3}


@dataclass(frozen=True)
class ClientKey:
    """Who a client key belongs to, and what it may do. The key itself is kept only hashed."""

    name: str
    priority: int | None = None  # default X-Priority rank for its requests
    rate_per_s: float | None = None  # at most this many requests a second (None: no limit)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_client_keys(text: str) -> dict[bytes, ClientKey]:
    """Entries separated by newlines or commas: ``KEY [name=N] [priority=P] [rate=R]``.

    ``#`` starts a comment. Raises ValueError naming the entry (by number, never the key).
    """
    keys: dict[bytes, ClientKey] = {}
    entries = [e.split("#", 1)[0].strip() for line in text.splitlines() for e in line.split(",")]
    for number, entry in enumerate((e for e in entries if e), start=1):
        key, *options = entry.split()
        fields: dict[str, str] = {}
        for option in options:
            name, sep, value = option.partition("=")
            if not sep or name not in ("name", "priority", "rate") or not value:
                raise ValueError(
                    f"client key {number}: bad option {option!r} "
                    "(expected name=..., priority=low|normal|high|urgent, rate=<per second>)"
                )
            fields[name] = value
        if len(key) < 8:
            raise ValueError(f"client key {number}: too short (at least 8 characters)")
        priority = fields.get("priority")
        if priority is not None and priority not in PRIORITY_RANKS:
            raise ValueError(f"client key {number}: priority must be low, normal, high or urgent")
        rate = None
        if "rate" in fields:
            try:
                rate = float(fields["rate"].removesuffix("/s"))
            except ValueError:
                rate = -1.0
            if not rate > 0 or rate == float("inf"):
                raise ValueError(f"client key {number}: rate must be a positive number per second")
        digest = _digest(key)
        if digest in keys:
            raise ValueError(f"client key {number}: listed twice")
        keys[digest] = ClientKey(
            name=fields.get("name", f"key{number}"),
            priority=PRIORITY_RANKS[priority] if priority is not None else None,
            rate_per_s=rate,
        )
    return keys


def presented_key(api_key: str | None, authorization: str | None) -> str | None:
    """The key a request carries: ``X-API-Key``, else an ``Authorization: Bearer`` token."""
    if api_key:
        return api_key.strip()
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class ClientAuth:
    """Client keys and their rate limits. Lookup hashes the presented key, so its time does
    not depend on how much of a real key it matches."""

    def __init__(
        self,
        keys: dict[bytes, ClientKey],
        admin_key: str | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = keys
        self._admin = _digest(admin_key) if admin_key else None
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        # [cluster]: one bucket per key for the whole fleet, ``shared(bucket, rate, burst)``
        # answering the seconds to wait (0.0: taken) or None (Redis away: decide here).
        self.shared: SharedBucket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, presented: str | None) -> ClientKey | None:
        """The client a key belongs to (the admin key is a client with no limits), or None."""
        if presented is None:
            return None
        digest = _digest(presented)
        if self._admin is not None and hmac.compare_digest(digest, self._admin):
            return ADMIN_CLIENT
        return self._keys.get(digest)

    async def shared_retry_after(self, client: ClientKey) -> int | None:
        """:meth:`retry_after` against the fleet's bucket for ``client`` (one per key across
        the replicas of a cluster); this replica's own bucket while the cluster's Redis is
        away."""
        rate = client.rate_per_s
        if rate is None or self.shared is None:
            return self.retry_after(client)
        wait = await self.shared(f"client:{client.name}", rate, max(rate, 1.0))
        if wait is None:
            return self.retry_after(client)
        return None if wait <= 0 else max(1, math.ceil(wait))

    def retry_after(self, client: ClientKey) -> int | None:
        """None when ``client`` may send a request now (it is counted); else seconds to wait."""
        rate = client.rate_per_s
        if rate is None:
            return None
        now = self._clock()
        burst = max(rate, 1.0)
        tokens, at = self._buckets.get(client.name, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[client.name] = (tokens - 1.0, now)
            return None
        self._buckets[client.name] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / rate))


ADMIN_CLIENT = ClientKey(name="admin")

SharedBucket = Callable[[str, float, float], Awaitable[float | None]]
