"""Shared control state: what an operator changes on one replica, every replica applies.

One Redis hash per kind (``{name}:state:kind:<kind>``: key -> JSON value), one version counter
for all of them, and a set of the kinds in use. A change is one script: write, bump the
version, announce "version, origin, kind, key, value" on ``{name}:state``. Other replicas apply
the announcement at once; a periodic check of the version (every ``resync_s``) and a gap in the
announced versions trigger a full re-read (one script, one consistent snapshot), which repairs
whatever pub/sub lost. Callbacks hear only real changes (a value equal to the one held is not
news), and never their own replica's writes (the writer applied them already).

While Redis is away, changes apply locally and are remembered; the resync writes them to Redis
(last writer wins), then re-reads everything.

Redis may come back without the state (restarted without persistence, flushed, replaced). An
epoch key, set once by whichever replica finds none, tells that apart from deletions: a
replica that finds another epoch than the one it read the state under writes its own copy
back instead of taking the loss for "every registration, drain and owed operation deleted".
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from typing import Any

import structlog

from corral.cluster import lua
from corral.cluster.link import ClusterUnavailableError, Keys, RedisLink, decode

log = structlog.get_logger("corral.cluster")

StateCallback = Callable[[str, str, Any], None]
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class ControlState:
    """A versioned ``kind -> key -> value`` store in Redis, cached here for cheap reads."""

    def __init__(self, link: RedisLink, keys: Keys, replica: str) -> None:
        self._link = link
        self._keys = keys
        self._replica = replica
        self._cache: dict[str, dict[str, str]] = {}  # kind -> key -> JSON text
        self._pending: dict[tuple[str, str], str | None] = {}  # written while Redis was away
        self._epoch: str | None = None  # the state's epoch in Redis when last read
        self.version = 0
        self.stale = False  # a gap in the announced versions: re-read soon
        self._callbacks: list[StateCallback] = []
        redis = link.redis
        self._set = redis.register_script(lua.STATE_SET)
        self._read = redis.register_script(lua.STATE_READ)

    def state(self, kind: str) -> dict[str, Any]:
        """Every key of ``kind`` and its value, as last seen here. No I/O."""
        return {key: json.loads(text) for key, text in self._cache.get(kind, {}).items()}

    def on_state(self, callback: StateCallback) -> None:
        """Call ``callback(kind, key, value)`` (value None: deleted) for each change another
        replica made, or that a re-read found."""
        self._callbacks.append(callback)

    async def set_state(self, kind: str, key: str, value: Any) -> None:
        """Set ``kind``/``key`` to ``value`` (JSON-serialisable; None deletes it), here at once
        and fleet-wide within a second. Never raises for Redis: while it is away the change is
        kept and written at the resync. Raises ValueError for a bad kind or key."""
        if not _KIND.match(kind):
            raise ValueError(f"state kind {kind!r}: lower-case letters, digits and _")
        if not key or "\n" in key:
            raise ValueError("state key: not empty, no newline")
        text = None if value is None else _dump(value)
        self._apply(kind, key, text)
        if self._link.up:
            try:
                await self._write(kind, key, text)
                return
            except ClusterUnavailableError:
                pass
        self._pending[(kind, key)] = text

    async def _write(self, kind: str, key: str, text: str | None) -> None:
        version = await self._link.run(
            self._set(
                keys=[
                    self._keys.state_kind(kind),
                    self._keys.state_version,
                    self._keys.state_kinds,
                ],
                args=[
                    kind,
                    key,
                    "1" if text is None else "0",
                    text or "",
                    self._keys.state,
                    self._replica,
                ],
            )
        )
        self._advance(int(version))

    async def _epoch_now(self) -> str:
        """The epoch of the state Redis holds; a new one when it holds none (first come,
        first set: replicas racing here agree on one)."""
        redis, key = self._link.redis, self._keys.state_epoch
        epoch = await self._link.run(redis.get(key))
        if epoch is None:
            await self._link.run(redis.set(key, secrets.token_hex(8), nx=True))
            epoch = await self._link.run(redis.get(key))
        return decode(epoch)

    def _advance(self, version: int) -> None:
        if version > self.version + 1 and self.version:
            self.stale = True  # some announcement went missing
        self.version = max(self.version, version)

    def _apply(self, kind: str, key: str, text: str | None) -> bool:
        """Put ``text`` in the cache; True when it changed something."""
        held = self._cache.get(kind, {})
        if held.get(key) == text:
            return False
        if text is None:
            held.pop(key, None)
        else:
            self._cache.setdefault(kind, held)[key] = text
        return True

    def _emit(self, kind: str, key: str, text: str | None) -> None:
        value = None if text is None else json.loads(text)
        for callback in self._callbacks:
            try:
                callback(kind, key, value)
            except Exception:
                log.exception("cluster: on_state callback failed", kind=kind, key=key)

    def heard(self, data: bytes) -> None:
        """An announcement on ``{name}:state``."""
        try:
            version, origin, kind, key, deleted, text = decode(data).split("\n", 5)
            number = int(version)
            if deleted == "0":
                json.loads(text)
        except ValueError:
            log.warning("cluster: malformed state announcement ignored")
            return
        self._advance(number)
        if origin == self._replica:
            return
        value = None if deleted == "1" else text
        if self._apply(kind, key, value):
            self._emit(kind, key, value)

    async def check(self) -> None:
        """The periodic repair: re-read everything when the version moved past what was
        announced here (or a gap was seen). One round trip when nothing changed. Raises
        ClusterUnavailableError."""
        version = int(await self._link.run(self._link.redis.get(self._keys.state_version)) or 0)
        if self.stale or version != self.version:
            await self.reload()

    async def reload(self) -> None:
        """Write what changed here while Redis was away (all of this replica's copy when
        Redis lost the state), then read every kind and tell the callbacks what differs.
        Raises ClusterUnavailableError."""
        epoch = await self._epoch_now()
        if self._epoch is not None and epoch != self._epoch:
            held = sum(len(keys) for keys in self._cache.values())
            log.warning(
                "cluster Redis lost the shared state; writing this replica's copy back",
                keys=held,
            )
            for kind, keys in self._cache.items():
                for key, value in keys.items():
                    self._pending.setdefault((kind, key), value)
        for (kind, key), text in list(self._pending.items()):
            await self._write(kind, key, text)
            del self._pending[(kind, key)]
        answer = await self._link.run(
            self._read(
                keys=[self._keys.state_version, self._keys.state_kinds],
                args=[self._keys.state_prefix],
            )
        )
        fresh: dict[str, dict[str, str]] = {}
        for i in range(1, len(answer), 2):
            pairs = answer[i + 1]
            fresh[decode(answer[i])] = {
                decode(pairs[j]): decode(pairs[j + 1]) for j in range(0, len(pairs), 2)
            }
        self.version = int(answer[0])
        self.stale = False
        self._epoch = epoch
        for kind in sorted(fresh.keys() | self._cache.keys()):
            new, old = fresh.get(kind, {}), self._cache.get(kind, {})
            for key in sorted(new.keys() | old.keys()):
                if new.get(key) != old.get(key):
                    self._apply(kind, key, new.get(key))
                    self._emit(kind, key, new.get(key))
