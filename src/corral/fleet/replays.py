"""Replays: the fleet-wide model operations a backend missed, kept until it has caught up.

A fleet-wide ``pull``, ``delete`` or ``copy`` (no ``?backend=``) is meant for every backend. One
that was down, draining or ejected, or failed it with a server error, owes the operation: the
ledger keeps it per backend, in order, and :class:`corral.proxy.fanout.FanOut` replays it once
the backend is available again. Only the fleet's intended state matters, so a newer operation on
the same model replaces an older one the backend still owes (a ``delete`` after a missed
``pull`` leaves only the ``delete``), unless a pending ``copy`` still reads that model.

The ledger is plain data: it survives a restart in the state file (``server.state_file``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.fleet.backends import normalize_model

REPLAYED = ("pull", "delete", "copy")
# A replay that keeps failing is tried again later, then given up (logged and counted).
MAX_ATTEMPTS = 10
BACKOFF_S = 2.0
MAX_BACKOFF_S = 300.0


@dataclass(slots=True)
class Replay:
    """One operation a backend owes: ``body`` is what the fleet was sent (for copy, with
    ``source`` and ``destination``); ``model`` the model it changes."""

    backend: str
    action: str
    body: dict[str, Any]
    reason: str  # "down", "draining" or "failed"
    since: float = field(default_factory=time.time)  # wall clock, shown to operators
    attempts: int = 0
    last_error: str | None = None
    not_before: float = 0.0  # monotonic; not kept across restarts

    @property
    def model(self) -> str:
        """The model this operation changes (the copy's destination)."""
        return _name(self.body, "destination" if self.action == "copy" else "model")

    @property
    def source(self) -> str | None:
        return _name(self.body, "source") if self.action == "copy" else None

    def view(self) -> dict[str, Any]:
        """The admin API's entry for this replay."""
        view: dict[str, Any] = {
            "backend": self.backend,
            "action": self.action,
            "model": self.model,
            "reason": self.reason,
            "since": round(self.since, 3),
            "attempts": self.attempts,
            "last_error": self.last_error,
        }
        if self.source is not None:
            view["source"] = self.source
        return view

    def record(self) -> dict[str, Any]:
        """What the state file keeps."""
        return {
            "backend": self.backend,
            "action": self.action,
            "body": self.body,
            "reason": self.reason,
            "since": self.since,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


def _name(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if key == "model" and not value:
        value = body.get("name")  # Ollama's older field
    return value if isinstance(value, str) else ""


class ReplayLedger:
    """Per backend, in order, the operations it owes. ``on_change`` runs after every change
    (the runtime saves the state file then)."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._owed: dict[str, list[Replay]] = {}
        self._on_change = on_change

    def __len__(self) -> int:
        return sum(len(owed) for owed in self._owed.values())

    def backends(self) -> list[str]:
        """Backends that owe something."""
        return [bid for bid, owed in self._owed.items() if owed]

    def owed(self, backend_id: str) -> list[Replay]:
        return list(self._owed.get(backend_id, ()))

    def all(self) -> list[Replay]:
        return [r for owed in self._owed.values() for r in owed]

    def hidden(self, backend_id: str) -> set[str]:
        """Model keys ``backend_id`` still lists but the fleet deleted: routing skips them."""
        return {
            normalize_model(r.model) for r in self._owed.get(backend_id, ()) if r.action == "delete"
        }

    def add(self, backend_ids: Iterable[tuple[str, str]], action: str, body: dict[str, Any]) -> str:
        """``(backend, reason)`` pairs missed ``action`` with ``body``: each now owes it.
        Returns the model the operation changes."""
        body = {k: v for k, v in body.items() if k != "stream"}
        model = Replay("", action, body, "").model
        if action not in REPLAYED:
            return model
        added = False
        for backend_id, reason in backend_ids:
            owed = self._owed.setdefault(backend_id, [])
            _supersede(owed, model)
            owed.append(Replay(backend_id, action, body, reason))
            added = True
        if added:
            self._changed()
        return model

    def settle(self, backend_ids: Iterable[str], action: str, body: dict[str, Any]) -> None:
        """``backend_ids`` just did ``action``: what they owed on its model is stale."""
        if action not in REPLAYED:
            return
        model = Replay("", action, body, "").model
        changed = False
        for backend_id in backend_ids:
            owed = self._owed.get(backend_id)
            if owed:
                before = len(owed)
                _supersede(owed, model)
                changed |= len(owed) != before
                if not owed:
                    del self._owed[backend_id]
        if changed:
            self._changed()

    def done(self, replay: Replay) -> None:
        """``replay`` succeeded (or was given up): it is owed no more."""
        owed = self._owed.get(replay.backend, [])
        if replay in owed:
            owed.remove(replay)
            if not owed:
                del self._owed[replay.backend]
            self._changed()

    def failed(self, replay: Replay, error: str, now: float) -> bool:
        """``replay`` failed again; True when it should be tried later, False when given up."""
        replay.attempts += 1
        replay.last_error = error
        replay.not_before = now + min(BACKOFF_S * 2 ** (replay.attempts - 1), MAX_BACKOFF_S)
        if replay.attempts >= MAX_ATTEMPTS:
            self.done(replay)
            return False
        self._changed()
        return True

    def forget(self, backend_id: str) -> None:
        """The backend left the fleet: it owes nothing."""
        if self._owed.pop(backend_id, None):
            self._changed()

    def records(self) -> list[dict[str, Any]]:
        return [r.record() for r in self.all()]

    def by_backend(self) -> dict[str, list[dict[str, Any]]]:
        """:meth:`records`, per backend (what a cluster shares)."""
        return {bid: [r.record() for r in owed] for bid, owed in self._owed.items() if owed}

    def replace(self, backend_id: str, records: Iterable[Any]) -> None:
        """What ``backend_id`` owes is ``records`` (another replica changed it): no
        ``on_change``, since the change is not this ledger's own."""
        self._owed.pop(backend_id, None)
        self.restore(r for r in records if isinstance(r, dict) and r.get("backend") == backend_id)

    def restore(self, records: Iterable[Any]) -> int:
        """Take back what :meth:`records` saved; entries that do not parse are skipped."""
        count = 0
        for rec in records:
            if not isinstance(rec, dict):
                continue
            backend, action, body = rec.get("backend"), rec.get("action"), rec.get("body")
            if not isinstance(backend, str) or action not in REPLAYED or not isinstance(body, dict):
                continue
            replay = Replay(backend, action, body, str(rec.get("reason") or "down"))
            since, attempts = rec.get("since"), rec.get("attempts")
            if isinstance(since, int | float):
                replay.since = float(since)
            if isinstance(attempts, int):
                replay.attempts = attempts
            if isinstance(rec.get("last_error"), str):
                replay.last_error = rec["last_error"]
            self._owed.setdefault(backend, []).append(replay)
            count += 1
        return count

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


def _supersede(owed: list[Replay], model: str) -> None:
    """Drop what ``owed`` holds for ``model`` that a newer operation on it replaces: every
    earlier entry that changes it, unless a later pending copy reads it as its source."""
    key = normalize_model(model)
    for i in range(len(owed) - 1, -1, -1):
        if normalize_model(owed[i].model) != key:
            continue
        read_later = any(
            r.source is not None and normalize_model(r.source) == key for r in owed[i + 1 :]
        )
        if not read_later:
            del owed[i]
