"""Runtime: the live parts of one corral process, built from Settings."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from corral.auth import ClientAuth
from corral.balancer.admission import Admission
from corral.balancer.replicas import Replicator
from corral.balancer.routing import Router
from corral.balancer.shared import SharedAdmission
from corral.config import RegisteredBackend, Settings, format_validation_error
from corral.errors import DuplicateBackendError, UnknownStrategyError
from corral.fleet.backends import BackendRegistry, BackendState
from corral.fleet.discovery import Discovery
from corral.fleet.gpu import GpuSampler, NullSampler, open_sampler
from corral.fleet.gpu.poller import GpuPoller
from corral.fleet.health import HealthChecker
from corral.fleet.inventory import ResidencyCollector
from corral.fleet.placement import PlacementManager, http_sender
from corral.fleet.replays import ReplayLedger
from corral.fleet.state import StateFile
from corral.lifecycle import Lifecycle
from corral.metrics import Metrics
from corral.proxy.bodies import Bodies
from corral.proxy.fanout import FanOut
from corral.proxy.forward import Forwarder
from corral.proxy.listing import Listing
from corral.systemd import sd_notify
from corral.upstream import Upstream

if TYPE_CHECKING:
    from corral.cluster import Cluster

log = structlog.get_logger("corral")

# The control state a cluster shares (corral.cluster.control), applied in this order at a
# resync: a backend exists before its drain, weight or heartbeat is applied to it.
STATE_KINDS = ("backends", "drains", "weights", "max_concurrent", "heartbeats", "strategy")


class Runtime:
    """Registry, router, admission, forwarder, health checker and metrics, wired together."""

    def __init__(
        self,
        settings: Settings,
        *,
        upstream: Upstream | None = None,
        gpu_sampler: GpuSampler | None = None,
    ) -> None:
        self.settings = settings
        self.admin_key = settings.resolved_admin_key()
        self.clients = ClientAuth(settings.resolved_client_keys(), self.admin_key)
        self.metrics = Metrics()
        # [cluster]: shared slots, state, limits and a leader through Redis (None: one corral).
        self.cluster: Cluster | None = None
        url = settings.cluster.redis_url
        if url is not None and url.get_secret_value():
            from corral.cluster import Cluster

            self.cluster = Cluster(settings.cluster, registry=self.metrics.registry)
            self.clients.shared = self.cluster.wait_s
        self._leading: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.registry = BackendRegistry(BackendState.from_settings(b) for b in settings.backends)
        self.upstream = upstream or Upstream(settings.timeouts)
        self.ledger = ReplayLedger(on_change=self._replays_changed)
        self.health = HealthChecker(
            self.registry, self.upstream, settings.health, self.metrics, hidden=self.ledger.hidden
        )
        self.router = Router(self.registry, settings.balancer, metrics=self.metrics)
        self.metrics.registry.register(ResidencyCollector(self.registry))
        self.metrics.watch_slots(
            lambda: [
                (b.id, b.in_flight + b.elsewhere, b.max_concurrent) for b in self.registry.all()
            ]
        )
        sampler = gpu_sampler or open_sampler(settings.gpu.enabled)
        if isinstance(sampler, NullSampler):
            backends = settings.backends
            mapped = [b.id for b in backends if b.gpu is not None and not b.gpu_metrics_url]
            # Loud only when the config expects local GPUs; one line either way.
            (log.warning if mapped else log.info)(
                "local GPU features off", reason=sampler.reason, backends_with_gpu=mapped
            )
        self.gpus = GpuPoller(
            self.registry, settings.gpu, self.metrics, sampler, fetch=self.upstream.get_bytes
        )
        self.placement = PlacementManager(
            self.registry,
            settings.placement,
            self.metrics,
            # A load waits like a cold request's first token does.
            send=http_sender(self.upstream, settings.timeouts.first_token_s),
            refresh=self.health.probe,
            poll_gpus=self.gpus.poll,
        )
        self.replicas = Replicator(
            self.registry,
            self.router,
            settings.placement,
            self.metrics,
            send=http_sender(self.upstream, settings.timeouts.first_token_s),
            refresh=self.health.probe,
        )
        self.admission = (
            Admission(self.router, settings.queue, self.metrics)
            if self.cluster is None
            else SharedAdmission(self.router, settings.queue, self.metrics, self.cluster)
        )
        self.forwarder = Forwarder(
            self.admission,
            self.upstream,
            self.health,
            self.metrics,
            settings.balancer,
        )
        self.listing = Listing(
            self.registry, self.upstream, settings.health.timeout_s + 3, self.metrics
        )
        self.fanout = FanOut(
            self.registry,
            self.upstream,
            self.health,
            admin_key=self.admin_key,
            open_to_clients=settings.auth.model_management == "clients",
            ledger=self.ledger,
            metrics=self.metrics,
            body_timeout_s=settings.server.body_timeout_s,
            listing=self.listing,
        )
        server = settings.server
        self.bodies = Bodies(
            int(server.max_body_mb * 1_000_000),
            server.body_timeout_s,
            int(server.max_buffered_mb * 1_000_000),
            self.metrics,
        )
        self.lifecycle = Lifecycle()
        self.draining = False
        self.metrics.set_strategy(self.router.strategy_name)
        self.state = StateFile(settings.server.state_file) if settings.server.state_file else None
        if self.cluster is not None and self.state is not None:
            # The cluster's Redis is the one store of registrations and owed operations.
            log.info("server.state_file unused: [cluster] shares the state through Redis")
            self.state = None
        self._restore()
        self.registry.on_change(self._on_change)
        if self.cluster is not None:
            self.cluster.on_state(self._apply_state)
            self.cluster.on_leadership(self._on_leadership)
            self.cluster.watch(self.registry.ids())
        # [[discovery]]: backends found in DNS (never in the state file: DNS has them).
        self.discovery = [
            Discovery(self.registry, entry, drain_timeout_s=settings.server.drain_timeout_s)
            for entry in settings.discovery
        ]

    def _restore(self) -> None:
        """Re-register the backends the state file remembers (dynamic ones must heartbeat)."""
        if self.state is None:
            return
        saved = self.state.load()
        if owed := self.ledger.restore(saved.replays):
            log.info("model operations owed by backends restored from state file", count=owed)
            self._count_owed()
        for record in saved.backends:
            try:
                # As strict as the admin API that registered it: the file may have been edited.
                cfg = RegisteredBackend.model_validate(record)
                backend = BackendState.from_settings(cfg, registered=True, ttl_s=cfg.ttl_s)
                self.registry.add(backend)
            except ValidationError as exc:
                problems = "; ".join(format_validation_error(exc))
                log.warning("state file entry skipped", entry=_brief(record), error=problems)
                continue
            except DuplicateBackendError as exc:
                log.warning("state file entry skipped", entry=_brief(record), error=str(exc))
                continue
            log.info("backend restored from state file", backend=backend.id, url=backend.url)

    def _on_change(self, event: str, backend: BackendState | None) -> None:
        if self.cluster is not None and event in ("added", "removed"):
            self.cluster.watch(self.registry.ids())
        if backend is None:
            return
        if event == "removed":
            self.ledger.forget(backend.id)
            self.metrics.forget_backend(backend.id)
            self.router.demand.forget(backend.id)
            log.info("backend removed", backend=backend.id)
        elif event == "added":
            log.info("backend added", backend=backend.id, url=backend.url)
        elif event == "expired":
            log.warning("backend missed its heartbeat; out of rotation", backend=backend.id)
        if (
            event == "removed"
            and backend.expired
            and self.cluster is not None
            and self.cluster.is_leader
        ):
            # It missed its heartbeats everywhere: the leader forgets its registration.
            self.share("backends", backend.id, None)
            self.share("heartbeats", backend.id, None)
        if (
            self.state is not None
            and backend.registered
            and event in ("added", "removed", "updated")
        ):
            self._save()

    def _save(self) -> None:
        if self.state is not None:
            self.state.save(self.registry.all(), self.ledger.records())

    def _replays_changed(self) -> None:
        self._count_owed()
        self._save()
        if self.cluster is not None:
            shared = self.cluster.state("replays")
            mine = self.ledger.by_backend()
            for backend_id in mine.keys() | shared.keys():
                records = mine.get(backend_id) or None
                if records != shared.get(backend_id):
                    self.share("replays", backend_id, records)

    # The cluster -------------------------------------------------------------------------

    async def publish(self, kind: str, key: str, value: Any) -> None:
        """Tell the other replicas of a local change (nothing without [cluster]). Never
        fails for Redis: while it is away the change is written at the resync."""
        if self.cluster is not None:
            await self.cluster.set_state(kind, key, value)

    def share(self, kind: str, key: str, value: Any) -> None:
        """:meth:`publish` from synchronous code, in the background."""
        if self.cluster is None:
            return
        task = asyncio.get_running_loop().create_task(self.cluster.set_state(kind, key, value))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _apply_state(self, kind: str, key: str, value: Any) -> None:
        """Apply a change another replica made (or a resync found), without writing back."""
        registry = self.registry
        if kind == "strategy":
            if isinstance(value, str) and value != self.router.strategy_name:
                try:
                    self.set_strategy(value)
                except UnknownStrategyError as exc:
                    log.warning("shared strategy not known here", error=str(exc))
            return
        if kind == "replays":
            self.ledger.replace(key, value if isinstance(value, list) else [])
            self._count_owed()
            return
        if kind == "backends":
            if value is None:
                if key in registry and registry.get(key).registered:
                    registry.remove(key)
            elif key not in registry:
                self._register_shared(value)
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

    def _register_shared(self, record: Any) -> None:
        try:
            cfg = RegisteredBackend.model_validate(record)
            backend = BackendState.from_settings(cfg, registered=True, ttl_s=cfg.ttl_s)
            self.registry.add(backend)
        except (ValidationError, DuplicateBackendError) as exc:
            log.warning("shared registration skipped", entry=_brief(record), error=str(exc))
            return
        assert self.cluster is not None
        for kind in ("drains", "weights", "max_concurrent"):
            value = self.cluster.state(kind).get(backend.id)
            if value is not None:
                self._apply_state(kind, backend.id, value)
        # Probe it now: it serves here within a probe, not a health interval.
        task = asyncio.get_running_loop().create_task(self.health.probe(backend))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_leadership(self, leader: bool) -> None:
        """The leader runs what must run once in the fleet: placement, replicas, replays."""
        if not leader:
            for task in self._leading:
                task.cancel()
            self._leading.clear()
            return
        if not self._leading:
            self._leading = self._start_once()

    def _start_once(self) -> list[asyncio.Task[Any]]:
        tasks = [self.lifecycle.start("replays", self.fanout.run_replays())]
        if self.settings.placement.enabled and self.placement.priority:
            tasks.append(self.lifecycle.start("placement", self.placement.run()))
        placement = self.settings.placement
        if placement.enabled and placement.demand and self.settings.balancer.model_affinity:
            tasks.append(self.lifecycle.start("replicas", self.replicas.run()))
        return tasks

    def _count_owed(self) -> None:
        owed: dict[str, int] = {}
        for replay in self.ledger.all():
            owed[replay.backend] = owed.get(replay.backend, 0) + 1
        gauge = self.metrics.replays_pending
        gauge.clear()
        for backend_id, count in owed.items():
            gauge.labels(backend=backend_id).set(count)

    def set_strategy(self, name: str) -> None:
        old = self.router.strategy_name
        self.router.set_strategy(name)
        self.metrics.set_strategy(name)
        log.info("strategy changed", old=old, new=name)

    async def start(self) -> None:
        """Join the cluster (if any), probe every backend once (bounded), then keep probing
        in the background."""
        # Joining re-reads the shared state: every part of it reaches _apply_state.
        if self.cluster is not None and not await self.cluster.connect():
            log.warning("cluster Redis unreachable at start; serving on the local view")
        if self.discovery:  # the first lookups, so that the first probe sees what they found
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(d.refresh() for d in self.discovery)),
                    max(d.settings.interval_s for d in self.discovery),
                )
            except TimeoutError:
                log.warning("initial DNS discovery did not finish in time")
        try:
            await asyncio.wait_for(self.health.probe_all(), self.settings.health.timeout_s + 1)
        except TimeoutError:
            log.warning("initial health probe did not finish in time")
        try:
            await asyncio.wait_for(self.gpus.poll(), 5)
        except TimeoutError:
            log.warning("initial GPU poll did not finish in time")
        healthy = sum(b.healthy for b in self.registry.all())
        log.info(
            "corral started",
            backends=len(self.registry),
            healthy=healthy,
            strategy=self.router.strategy_name,
        )
        if self.cluster is not None:
            self.lifecycle.start("cluster", self.cluster.run())
        self.lifecycle.start("health", self.health.run())
        self.lifecycle.start("gpus", self.gpus.run())
        self.lifecycle.start("loop-lag", self._watch_loop_lag())
        for number, discovery in enumerate(self.discovery):
            self.lifecycle.start(f"discovery-{number}", discovery.run())
        if self.cluster is None:
            self._start_once()
        # (clustered: _on_leadership starts them on the leader only)
        sd_notify("READY=1")

    async def _watch_loop_lag(self, every_s: float = 0.05) -> None:
        """Measure how late the loop wakes a timer: the delay every request shares."""
        loop = asyncio.get_running_loop()
        observe = self.metrics.loop_lag.observe
        while True:
            planned = loop.time() + every_s
            await asyncio.sleep(every_s)
            observe(max(loop.time() - planned, 0.0))

    async def wait_idle(self, backend: BackendState, timeout_s: float) -> bool:
        """Wait until ``backend`` has nothing in flight; False when ``timeout_s`` passes first."""
        idle = asyncio.Event()

        def check() -> None:
            if backend.in_flight == 0:
                idle.set()

        self.registry.on_capacity(check)
        try:
            check()
            await asyncio.wait_for(idle.wait(), timeout_s)
        except TimeoutError:
            return False
        finally:
            self.registry.off_capacity(check)
        return True

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting (queued and new requests get 503), wait for in-flight ones to end.

        Returns True when everything finished within ``grace_s``.
        """
        self.draining = True
        self.admission.close("corral is shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        idle = asyncio.Event()

        def check() -> None:
            if all(b.in_flight == 0 for b in self.registry.all()):
                idle.set()

        self.registry.on_capacity(check)
        check()
        remaining = deadline - loop.time()
        try:
            await asyncio.wait_for(idle.wait(), max(remaining, 0))
        except TimeoutError:
            return False
        finally:
            self.registry.off_capacity(check)
        return True

    async def stop(self) -> None:
        await self.lifecycle.stop()
        if self.cluster is not None:
            if isinstance(self.admission, SharedAdmission):
                await self.admission.close_shared()
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
            await self.cluster.close()
        await self.fanout.stop_replays()
        await self.bodies.close()
        self.gpus.close()
        await self.upstream.close()
        log.info("corral stopped")


def _brief(record: object) -> str:
    """A state file entry for a log line: bounded (the file may hold anything)."""
    text = repr(record)
    return text if len(text) <= 300 else text[:300] + "…"
