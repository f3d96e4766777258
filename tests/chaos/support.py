"""Shared pieces of the chaos suite: corral's settings for it, polling, health.

The contract every scenario checks under its fault: each request ends with a complete answer or a
clear error (:mod:`tests.chaos.load`), the in-flight gauges return to 0 and no socket or asyncio
task is left behind (:mod:`tests.chaos.leaks`), and health recovers once the fault is gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tests.helpers import poll

LB = "/api/v1/loadbalancer"

# Short enough that every fault resolves within a second or two, so the suite stays bounded.
CHAOS_SECTIONS: dict[str, dict[str, Any]] = {
    "health": {
        "interval_s": 0.2,
        "timeout_s": 0.5,
        "fall": 2,
        "rise": 1,
        "backoff_max_s": 0.5,
        "ejection_s": 1,
        "max_ejection_s": 2,
    },
    "timeouts": {"connect_s": 1, "first_token_s": 2, "idle_s": 1},
    "queue": {"timeout_s": 3},
    "gpu": {"enabled": False},
    "placement": {"enabled": False},
}
# Plain rotation, so every fault meets its share of the load (no affinity steering it away).
ROTATION: dict[str, Any] = {
    "strategy": "round_robin",
    "model_affinity": False,
    "session_affinity": False,
}


def admin_headers() -> dict[str, str]:
    key = os.environ.get("CORRAL_ADMIN_KEY")
    return {"X-API-Key": key} if key else {}


def loads(corral: Any) -> dict[str, Any]:
    with corral.client(timeout=5) as client:
        resp = client.get(f"{LB}/loads", headers=admin_headers())
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()["loads"]
        return result


def wait_healthy(corral: Any, ids: Iterable[str], timeout_s: float = 10.0) -> None:
    """``/readyz`` answers 200 and each of ``ids`` is healthy and available in the loads."""
    wanted = list(ids)

    def ready() -> bool:
        with corral.client(timeout=5) as client:
            if client.get("/readyz").status_code != 200:
                return False
        entries = loads(corral)
        return all(entries[i]["healthy"] and entries[i]["available"] for i in wanted)

    assert poll(ready, timeout_s, 0.05), f"not healthy in {timeout_s:g}s: {loads(corral)}"


__all__ = ["CHAOS_SECTIONS", "LB", "ROTATION", "admin_headers", "loads", "poll", "wait_healthy"]
