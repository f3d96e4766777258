"""Who may use admin-only routes: the admin key, compared in constant time, or loopback."""

from __future__ import annotations

import hmac
import ipaddress


def is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return host == "localhost"


def admin_denial(
    key: str | None, api_key: str | None, authorization: str | None, client_host: str | None
) -> tuple[int, str] | None:
    """Why a caller may not use an admin-only route, as (status, message); None if it may.

    ``X-API-Key`` or an ``Authorization: Bearer`` token must equal ``key`` (constant-time
    comparison); with no key configured only loopback callers are let in.
    """
    if key is None:
        if is_loopback(client_host):
            return None
        return 403, "the admin API only answers loopback callers when no admin key is set"
    given = api_key
    if given is None and authorization:
        scheme, _, token = authorization.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if given is not None and hmac.compare_digest(given.encode(), key.encode()):
        return None
    return 401, "unauthorized"
