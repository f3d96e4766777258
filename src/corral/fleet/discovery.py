"""Discovery: backends found in DNS (a Kubernetes headless Service), re-resolved on a timer.

``[[discovery]] dns = "host:port"`` reads the A/AAAA records of ``host``: each address is one
backend at ``port``. ``dns = "_service._proto.name"`` reads SRV records: each target (resolved
to its addresses) at the record's port. A name with neither (``"ollama"``) is ``host:11434``.

A backend that appears is added to the registry (its id made of the name, the address and the
port, so the same pod gets the same id every time); the health checker probes it like any
other, and it takes requests once a probe succeeded. One that leaves DNS is drained, then
removed once nothing is in flight (or after ``server.drain_timeout_s``); one that comes back
before that is enabled again. A failed lookup (NXDOMAIN, a timeout) or an empty answer changes
nothing: a DNS outage must not empty the fleet, and the health checker takes pods that are
really gone out of rotation. Discovered backends are not written to the state file.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import structlog
from pydantic import ValidationError

from corral.config import (
    BackendSettings,
    DiscoverySettings,
    format_validation_error,
    parse_target,
)
from corral.errors import ConfigError, CorralError, DuplicateBackendError, UnknownBackendError
from corral.fleet.backends import BackendRegistry, BackendState

log = structlog.get_logger("corral.discovery")

Clock = Callable[[], float]

# Backend ids: BackendSettings' pattern, at most 64 characters.
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]+")
_PREFIX_MAX = 18  # leaves room for the longest IPv6 address (39) and a port


class ResolutionError(CorralError):
    """A DNS lookup failed (no such name, no answer in time, no usable record)."""


class Resolver(Protocol):
    """The DNS seam: the system resolver in production, a stub in tests."""

    async def addresses(self, host: str, port: int) -> list[str]:
        """The IPv4 and IPv6 addresses of ``host``; raises ResolutionError."""
        ...

    async def services(self, name: str) -> list[tuple[str, int]]:
        """The SRV records of ``name`` as (target host, port); raises ResolutionError."""
        ...


class SystemResolver:
    """A/AAAA through the system's resolver (``loop.getaddrinfo``: /etc/hosts, resolv.conf's
    search domains, as every other program on the host resolves), SRV through dnspython's
    asyncio resolver (the standard library reads no SRV records). Neither blocks the loop."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        # getaddrinfo runs in a thread that cannot be cancelled: a lookup still running when
        # the next round comes is awaited again, never started twice.
        self._pending: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._dns: Any = None

    async def addresses(self, host: str, port: int) -> list[str]:
        key = (host, port)
        future = self._pending.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = asyncio.ensure_future(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            )
            self._pending[key] = future
            future.add_done_callback(lambda _: self._pending.pop(key, None))
        try:
            infos = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            raise ResolutionError(f"{host}: no answer within {self.timeout_s:g}s") from None
        except OSError as exc:  # socket.gaierror: no such name, no address, resolver down
            raise ResolutionError(f"{host}: {exc.strerror or exc}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def services(self, name: str) -> list[tuple[str, int]]:
        import dns.asyncresolver
        import dns.exception
        import dns.resolver

        try:
            if self._dns is None:
                self._dns = dns.asyncresolver.Resolver()  # reads /etc/resolv.conf
            # search: a relative name (_ollama._tcp.ollama) is tried in the pod's domains.
            answer = await self._dns.resolve(name, "SRV", search=True, lifetime=self.timeout_s)
        except dns.resolver.NXDOMAIN:
            raise ResolutionError(f"{name}: no such name") from None
        except dns.resolver.NoAnswer:
            raise ResolutionError(f"{name}: no SRV record") from None
        except dns.exception.Timeout:
            raise ResolutionError(f"{name}: no answer within {self.timeout_s:g}s") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise ResolutionError(f"{name}: {exc}") from None
        records: list[tuple[str, int]] = []
        for record in answer:
            target = record.target.to_text(omit_final_dot=True)
            if target and target != ".":  # "." is "no such service here" (RFC 2782)
                records.append((target, int(record.port)))
        return records


class Endpoint(NamedTuple):
    address: str  # an IP address, as the resolver gave it
    port: int


@dataclass
class _Gone:
    """A discovered backend no longer in DNS: drained, removed at ``deadline`` at the latest."""

    deadline: float
    drained_before: bool  # an admin drained it already: coming back does not enable it


class Discovery:
    """Keeps the registry in step with one ``[[discovery]]`` entry."""

    def __init__(
        self,
        registry: BackendRegistry,
        settings: DiscoverySettings,
        *,
        drain_timeout_s: float,
        resolver: Resolver | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.target = parse_target(settings.dns)  # checked already when the config was read
        self.registry = registry
        self.settings = settings
        self.drain_timeout_s = drain_timeout_s
        self.resolver: Resolver = resolver or SystemResolver(min(settings.interval_s, 5.0))
        self._clock = clock
        self.prefix = _prefix(self.target.name)
        self.owned: set[str] = set()  # ids this entry added and has not removed
        self.gone: dict[str, _Gone] = {}
        self.failing = False
        self.failures = 0
        self.rounds = 0
        self._noted: set[str] = set()  # skipped ids already warned about
        self._sweep_soon = False
        # A bad template is a config error, told at start rather than per pod.
        self.backend_settings(Endpoint("10.0.0.1", 1))

    @property
    def name(self) -> str:
        return self.settings.dns

    def backend_id(self, endpoint: Endpoint) -> str:
        """``ollama-10-0-0-7-11434``: the same pod at the same address keeps its id."""
        address = endpoint.address.replace(".", "-").replace(":", "-")
        return f"{self.prefix}-{address}-{endpoint.port}"

    def backend_settings(self, endpoint: Endpoint) -> BackendSettings:
        """The backend at ``endpoint``, with this entry's limits and DCGM exporter."""
        host = _url_host(endpoint.address)
        template = self.settings.gpu_metrics_url
        try:
            return BackendSettings(
                id=self.backend_id(endpoint),
                url=f"http://{host}:{endpoint.port}",
                max_concurrent=self.settings.max_concurrent,
                max_loaded_models=self.settings.max_loaded_models,
                gpu_metrics_url=template.replace("{host}", host) if template else None,
            )
        except ValidationError as exc:
            problems = [f"discovery ({self.name}): {p}" for p in format_validation_error(exc)]
            raise ConfigError(problems) from None

    async def run(self) -> None:
        """Re-resolve every ``interval_s`` (the first round at once, unless :meth:`refresh`
        ran already); each round logs its own errors."""
        loop = asyncio.get_running_loop()

        def capacity() -> None:
            # A slot freed: a drained backend that became idle can go now, not next round.
            # Deferred: the registry is in the middle of a change when it calls this.
            if self.gone and not self._sweep_soon:
                self._sweep_soon = True
                loop.call_soon(self._deferred_sweep)

        self.registry.on_capacity(capacity)
        try:
            if self.rounds:
                await asyncio.sleep(self.settings.interval_s)
            while True:
                try:
                    await self.refresh()
                except Exception:
                    log.exception("discovery round failed", dns=self.name)
                await asyncio.sleep(self.settings.interval_s)
        finally:
            self.registry.off_capacity(capacity)

    def _deferred_sweep(self) -> None:
        self._sweep_soon = False
        self.sweep()

    async def refresh(self) -> None:
        """One round: resolve, add what appeared, drain what left, remove what drained."""
        self.rounds += 1
        try:
            endpoints = await self.resolve()
            if not endpoints:
                raise ResolutionError(f"{self.target.name}: no usable address")
        except ResolutionError as exc:
            self.failures += 1
            if not self.failing:
                self.failing = True
                log.warning(
                    "DNS lookup failed; discovered backends kept as they are",
                    dns=self.name,
                    error=str(exc),
                )
            else:
                log.debug("DNS lookup still failing", dns=self.name, error=str(exc))
        else:
            if self.failing:
                self.failing = False
                log.info("DNS lookup works again", dns=self.name, addresses=len(endpoints))
            self.reconcile(endpoints)
        self.sweep()

    async def resolve(self) -> list[Endpoint]:
        """Every endpoint the name has now; IPv4 only when a pod has both (dual stack)."""
        if self.target.port is not None:
            pairs = [(self.target.name, self.target.port)]
        else:
            pairs = await self.resolver.services(self.target.name)
        found: list[Endpoint] = []
        for host, port in pairs:
            addresses = [a for a in await self.resolver.addresses(host, port) if _usable(a)]
            v4 = [a for a in addresses if ":" not in a]
            found += [Endpoint(a, port) for a in (v4 or addresses)]
        return list(dict.fromkeys(found))

    def reconcile(self, endpoints: Iterable[Endpoint]) -> None:
        """Bring the registry in step with ``endpoints`` (this entry's backends only)."""
        seen: set[str] = set()
        for endpoint in endpoints:
            cfg = self.backend_settings(endpoint)
            seen.add(cfg.id)
            if cfg.id in self.gone:
                self._back(cfg.id)
            elif cfg.id not in self.owned or cfg.id not in self.registry:
                self._add(cfg)
        for backend_id in sorted(self.owned - seen - set(self.gone)):
            self._drain(backend_id)

    def _add(self, cfg: BackendSettings) -> None:
        clash = next(
            (b.id for b in self.registry.all() if b.url == cfg.url and b.id not in self.owned),
            None,
        )
        try:
            if clash is not None:
                raise DuplicateBackendError(clash)
            self.registry.add(BackendState.from_settings(cfg))
        except DuplicateBackendError as exc:
            if cfg.id not in self._noted:
                self._noted.add(cfg.id)
                log.warning(
                    "discovered address skipped: another backend has its id or URL",
                    dns=self.name,
                    backend=cfg.id,
                    url=cfg.url,
                    other=exc.backend_id,
                )
            return
        self._noted.discard(cfg.id)
        self.owned.add(cfg.id)
        log.info("discovered backend added", dns=self.name, backend=cfg.id, url=cfg.url)

    def _drain(self, backend_id: str) -> None:
        try:
            backend = self.registry.get(backend_id)
        except UnknownBackendError:  # removed meanwhile (the admin API): nothing to drain
            self.owned.discard(backend_id)
            return
        self.gone[backend_id] = _Gone(self._clock() + self.drain_timeout_s, backend.draining)
        self.registry.drain(backend_id)
        log.info(
            "discovered backend left DNS; drained",
            dns=self.name,
            backend=backend_id,
            in_flight=backend.in_flight,
        )

    def _back(self, backend_id: str) -> None:
        gone = self.gone.pop(backend_id)
        if backend_id not in self.registry:
            self.owned.discard(backend_id)
            return
        if not gone.drained_before:
            self.registry.enable(backend_id)
        log.info(
            "discovered backend back in DNS",
            dns=self.name,
            backend=backend_id,
            enabled=not gone.drained_before,
        )

    def sweep(self) -> None:
        """Remove the drained backends that are idle, or past their drain deadline."""
        now = self._clock()
        for backend_id, gone in list(self.gone.items()):
            try:
                backend = self.registry.get(backend_id)
            except UnknownBackendError:
                del self.gone[backend_id]
                self.owned.discard(backend_id)
                continue
            if backend.in_flight and now < gone.deadline:
                continue
            del self.gone[backend_id]
            self.owned.discard(backend_id)
            self.registry.remove(backend_id)
            # Requests still running (past the deadline) finish on their own.
            log.info(
                "discovered backend removed",
                dns=self.name,
                backend=backend_id,
                in_flight=backend.in_flight,
            )


def _prefix(name: str) -> str:
    """The id prefix: the first label that is not ``_service``/``_proto`` (``ollama``)."""
    labels = [label for label in name.split(".") if label and not label.startswith("_")]
    try:
        ipaddress.ip_address(name)
        labels = []
    except ValueError:
        pass
    prefix = _ID_UNSAFE.sub("-", labels[0] if labels else "").strip("-")[:_PREFIX_MAX]
    return prefix.rstrip("-") or "discovered"


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _usable(address: str) -> bool:
    """An address a URL can name: not a scoped (link-local, ``fe80::1%eth0``) one."""
    if "%" in address:
        return False
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
