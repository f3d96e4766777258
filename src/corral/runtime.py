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
from corral.errors import DuplicateBackendError
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
from corral.sync import ClusterSync, brief
from corral.systemd import sd_notify
from corral.upstream import Upstream

if TYPE_CHECKING:
    from corral.cluster import Cluster

log = structlog.get_logger("corral")


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
        self.sync: ClusterSync | None = None  # the cluster's control state, applied here
        url = settings.cluster.redis_url
        if url is not None and url.get_secret_value():
            from corral.cluster import Cluster

            self.cluster = Cluster(settings.cluster, registry=self.metrics.registry)
            self.clients.shared = self.cluster.wait_s
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
            self.sync = ClusterSync(
                self.cluster,
                self.registry,
                self.ledger,
                strategy=lambda: self.router.strategy_name,
                set_strategy=self.set_strategy,
                replays_changed=self._count_owed,
                probe=self.health.probe,
                start_once=self._start_once,
            )
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
                log.warning("state file entry skipped", entry=brief(record), error=problems)
                continue
            except DuplicateBackendError as exc:
                log.warning("state file entry skipped", entry=brief(record), error=str(exc))
                continue
            log.info("backend restored from state file", backend=backend.id, url=backend.url)

    def _on_change(self, event: str, backend: BackendState | None) -> None:
        if self.sync is not None:
            self.sync.changed(event, backend)
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
        if self.sync is not None:
            self.sync.share_replays()

    async def publish(self, kind: str, key: str, value: Any) -> None:
        """Tell the other replicas of a local change (nothing without [cluster]). Never
        fails for Redis: while it is away the change is written at the resync."""
        if self.sync is not None:
            await self.sync.publish(kind, key, value)

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
        # (clustered: ClusterSync starts them on the leader only)
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
            if self.sync is not None:
                await self.sync.close()
            await self.cluster.close()
        await self.fanout.stop_replays()
        await self.bodies.close()
        self.gpus.close()
        await self.upstream.close()
        log.info("corral stopped")
