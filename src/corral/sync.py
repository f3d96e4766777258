"""One replica's side of a cluster's shared control state (``[cluster]``).

Changes made here (the admin API, an expired registration, owed model operations) are written
to the cluster's Redis; changes any replica made (or a resync found) are applied here without
writing back; and what must run once in the fleet (placement, replicas, replays) runs while
this replica leads. The Redis side is :mod:`corral.cluster`; this is the glue to the registry,
the router and the replay ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from corral.config import RegisteredBackend
from corral.errors import DuplicateBackendError, UnknownStrategyError
from corral.fleet.backends import BackendRegistry, BackendState
from corral.fleet.replays import ReplayLedger

if TYPE_CHECKING:
    from corral.cluster import Cluster

log = structlog.get_logger("corral")

# The control state a cluster shares (corral.cluster.control), applied in this order at a
# resync: a backend exists before its drain, weight or heartbeat is applied to it.
STATE_KINDS = ("backends", "drains", "weights", "max_concurrent", "heartbeats", "strategy")


class ClusterSync:
    """Writes this replica's control changes to the cluster and applies the others'."""

    def __init__(
        self,
        cluster: Cluster,
        registry: BackendRegistry,
        ledger: ReplayLedger,
        *,
        strategy: Callable[[], str],
        set_strategy: Callable[[str], None],
        replays_changed: Callable[[], None],
        probe: Callable[[BackendState], Any],
        start_once: Callable[[], list[asyncio.Task[Any]]],
    ) -> None:
        self.cluster = cluster
        self.registry = registry
        self.ledger = ledger
        self._strategy = strategy
        self._set_strategy = set_strategy
        self._replays_changed = replays_changed
        self._probe = probe
        self._start_once = start_once
        self._leading: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        cluster.on_state(self.apply)
        cluster.on_leadership(self._on_leadership)
        cluster.watch(registry.ids())

    # Writing ------------------------------------------------------------------------------

    async def publish(self, kind: str, key: str, value: Any) -> None:
        """Tell the other replicas of a local change. Never fails for Redis: while it is away
        the change is written at the resync."""
        await self.cluster.set_state(kind, key, value)

    def share(self, kind: str, key: str, value: Any) -> None:
        """:meth:`publish` from synchronous code, in the background."""
        self._spawn(self.cluster.set_state(kind, key, value))

    def changed(self, event: str, backend: BackendState | None) -> None:
        """A registry event here: keep the fleet-wide counts watched; a registration that
        missed its heartbeats is forgotten fleet-wide, by the leader."""
        if event in ("added", "removed"):
            self.cluster.watch(self.registry.ids())
        if (
            event == "removed"
            and backend is not None
            and backend.expired
            and self.cluster.is_leader
        ):
            self.share("backends", backend.id, None)
            self.share("heartbeats", backend.id, None)

    def share_replays(self) -> None:
        """Write the owed model operations that differ from the shared ones."""
        shared = self.cluster.state("replays")
        mine = self.ledger.by_backend()
        for backend_id in mine.keys() | shared.keys():
            records = mine.get(backend_id) or None
            if records != shared.get(backend_id):
                self.share("replays", backend_id, records)

    # Applying -----------------------------------------------------------------------------

    def apply(self, kind: str, key: str, value: Any) -> None:
        """Apply a change another replica made (or a resync found), without writing back."""
        registry = self.registry
        if kind == "strategy":
            if isinstance(value, str) and value != self._strategy():
                try:
                    self._set_strategy(value)
                except UnknownStrategyError as exc:
                    log.warning("shared strategy not known here", error=str(exc))
            return
        if kind == "replays":
            self.ledger.replace(key, value if isinstance(value, list) else [])
            self._replays_changed()
            return
        if kind == "backends":
            if value is None:
                if key in registry and registry.get(key).registered:
                    registry.remove(key)
            elif key not in registry:
                self._register(value)
            return
        if key not in registry:
            return  # applied when (if) it is registered here
        backend = registry.get(key)
        if kind == "drains":
            if value:
                registry.drain(key)
            elif backend.draining and not backend.expired:
                registry.enable(key)
        elif kind == "weights":
            backend.weight = value if isinstance(value, int | float) else None
            registry.notify()
        elif kind == "max_concurrent" and isinstance(value, int) and value > 0:
            backend.max_concurrent = value
            registry.notify()
        elif kind == "heartbeats" and isinstance(value, dict) and backend.dynamic:
            ttl = value.get("ttl_s")
            registry.heartbeat(key, float(ttl) if isinstance(ttl, int | float) else None)

    def _register(self, record: Any) -> None:
        try:
            cfg = RegisteredBackend.model_validate(record)
            backend = BackendState.from_settings(cfg, registered=True, ttl_s=cfg.ttl_s)
            self.registry.add(backend)
        except (ValidationError, DuplicateBackendError) as exc:
            log.warning("shared registration skipped", entry=brief(record), error=str(exc))
            return
        for kind in ("drains", "weights", "max_concurrent"):
            value = self.cluster.state(kind).get(backend.id)
            if value is not None:
                self.apply(kind, backend.id, value)
        # Probe it now: it serves here within a probe, not a health interval.
        self._spawn(self._probe(backend))

    # Leading ------------------------------------------------------------------------------

    def _on_leadership(self, leader: bool) -> None:
        """The leader runs what must run once in the fleet: placement, replicas, replays."""
        if not leader:
            for task in self._leading:
                task.cancel()
            self._leading.clear()
            return
        if not self._leading:
            self._leading = self._start_once()

    @property
    def leading(self) -> list[asyncio.Task[Any]]:
        """What runs here because this replica leads (empty on a follower)."""
        return self._leading

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Finish the writes still under way (at stop)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def brief(record: object) -> str:
    """A state entry for a log line: bounded (a file or Redis may hold anything)."""
    text = repr(record)
    return text if len(text) <= 300 else text[:300] + "…"
