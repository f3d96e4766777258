"""Running corral under uvicorn (uvloop + httptools), with a graceful SIGTERM drain.

``serve --workers N`` runs N such servers as processes on one port: each binds its own
socket with SO_REUSEPORT (the kernel spreads connections over them) and is a whole corral
(its own listener protocol, drain, and cluster replica id), sharing slots and state with the
others through ``[cluster]``'s Redis. The parent only starts them, passes SIGTERM/SIGINT on
(each worker drains its own requests) and exits with the worst exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import resource
import signal
import socket
import sys
from collections.abc import Iterator
from types import FrameType

import structlog
import uvicorn

from corral.app import CorralApp, create_app
from corral.config import ServerSettings, Settings
from corral.listener import ADMIN_HEADROOM, ConnectionGate, EdgeLimits, edge_protocol
from corral.logs import configure_logging
from corral.systemd import sd_notify

log = structlog.get_logger("corral")


class CorralServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing the listener.

    Draining: /readyz turns 503, new and queued requests get 503 + Retry-After, in-flight
    streams run to their end (up to ``server.drain_timeout_s``), then the server exits 0.
    A second signal exits at once.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        app: CorralApp,
        admin: uvicorn.Config | None = None,
        admin_sockets: list[socket.socket] | None = None,
    ) -> None:
        super().__init__(config)
        self.corral = app
        self._drain_task: asyncio.Task[None] | None = None
        self.admin = _AdminServer(admin) if admin is not None else None
        self._admin_sockets = admin_sockets

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve the main port, and the admin listener beside it when there is one."""
        if self.admin is None:
            await super().serve(sockets)
            return
        admin = asyncio.create_task(self.admin.serve(self._admin_sockets), name="admin-listener")
        try:
            await super().serve(sockets)
        finally:
            self.admin.should_exit = True
            await admin

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime = self.corral.runtime
        if (
            self._drain_task is None
            and not self.should_exit
            and sig
            in (
                signal.SIGTERM,
                signal.SIGINT,
            )
        ):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._drain_task = loop.create_task(self._drain())
                return
        if runtime.draining:
            self.force_exit = True
        self.should_exit = True

    async def _drain(self) -> None:
        runtime = self.corral.runtime
        sd_notify("STOPPING=1")
        grace = runtime.settings.server.drain_timeout_s
        log.info("draining: finishing in-flight requests", grace_s=grace)
        finished = await runtime.drain(grace)
        if not finished:
            log.warning("drain grace period over; closing remaining streams")
        self.should_exit = True


class _AdminServer(uvicorn.Server):
    """The admin listener: shares the loop and leaves signals to the main server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def connection_gate(app: CorralApp, settings: Settings, *, admin: bool) -> ConnectionGate:
    """The process's one gate on client connections; logs the cap if descriptors lower it."""
    server = settings.server
    gate = ConnectionGate(
        server.max_connections, app.runtime.metrics, headroom=ADMIN_HEADROOM if admin else 0
    )
    if gate.cap < server.max_connections:
        log.warning(
            "descriptor limit lowers max_connections",
            max_connections=server.max_connections,
            effective=gate.cap,
            nofile=gate.nofile,
        )
    return gate


def _edge(
    server: ServerSettings, gate: ConnectionGate, headroom: int = 0
) -> type[asyncio.Protocol]:
    """The listener's protocol: uvicorn's httptools one with the edge's limits."""
    limits = EdgeLimits(
        gate,
        header_timeout_s=server.header_timeout_s,
        max_header_bytes=server.max_header_bytes,
        max_headers=server.max_headers,
        headroom=headroom,
    )
    return edge_protocol(limits)


def uvicorn_config(
    app: CorralApp, settings: Settings, *, gate: ConnectionGate | None = None, **kwargs: object
) -> uvicorn.Config:
    if gate is None:
        gate = connection_gate(app, settings, admin=False)
    return uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http=_edge(settings.server, gate),
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=settings.server.log_level,
        timeout_keep_alive=settings.server.idle_timeout_s,  # type: ignore[arg-type]
        # corral reads no X-Forwarded-* headers; skipping uvicorn's middleware saves CPU.
        proxy_headers=False,
        # After the drain, streams still open get a short last chance before the cut.
        timeout_graceful_shutdown=5,
        **kwargs,  # type: ignore[arg-type]
    )


def build_server(settings: Settings, *, shared_port: bool = False) -> CorralServer:
    app = create_app(settings)
    admin = None
    gate = connection_gate(app, settings, admin=app.admin_api is not None)
    if app.admin_api is not None and settings.server.admin_port is not None:
        admin = uvicorn.Config(
            app.admin_api,
            host=settings.server.admin_host,
            port=settings.server.admin_port,
            loop="none",
            # The same limits, and the same gate plus a few connections of its own.
            http=_edge(settings.server, gate, headroom=gate.headroom),
            lifespan="off",  # the main app's lifespan starts and stops the shared runtime
            access_log=False,
            log_config=None,
            log_level=settings.server.log_level,
            timeout_keep_alive=settings.server.idle_timeout_s,  # type: ignore[arg-type]
            proxy_headers=False,
        )
    admin_sockets = None
    if admin is not None and shared_port:
        admin_sockets = [reuse_port_socket(admin.host, admin.port)]
    return CorralServer(uvicorn_config(app, settings, gate=gate), app, admin, admin_sockets)


def raise_open_files(wanted: int = 65536) -> None:
    """Raise this process's soft limit on open files towards its hard limit (at most
    ``wanted``), as nginx's ``worker_rlimit_nofile`` does: a shell's usual 1,024 would cap
    client connections at a few hundred (see ``corral.listener``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_server(settings: Settings, workers: int = 1) -> None:
    configure_logging(settings.server.log_level, settings.server.log_format)
    raise_open_files()
    if workers > 1:
        sys.exit(run_workers(settings, workers))
    build_server(settings).run()


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other processes may bind too (SO_REUSEPORT): the kernel
    spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(settings: Settings, number: int) -> None:
    """One worker process: a whole corral on a SO_REUSEPORT socket of the shared port."""
    configure_logging(settings.server.log_level, settings.server.log_format)
    structlog.contextvars.bind_contextvars(worker=number)
    server = build_server(settings, shared_port=True)
    sock = reuse_port_socket(settings.server.host, settings.server.port)
    server.run(sockets=[sock])


def run_workers(settings: Settings, workers: int) -> int:
    """Run ``workers`` corral processes on one port; SIGTERM/SIGINT go to each of them (each
    drains). Returns the worst exit code."""
    if settings.server.port == 0:
        raise ValueError("--workers needs a fixed server.port (each worker binds it)")
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_worker, args=(settings, n), name=f"corral-worker-{n}")
        for n in range(workers)
    ]
    for proc in procs:
        proc.start()
    log.info(
        "corral workers started",
        workers=workers,
        pids=[p.pid for p in procs],
        port=settings.server.port,
    )

    def forward(sig: int, frame: FrameType | None) -> None:
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    worst = 0
    for proc in procs:
        proc.join()
        code = proc.exitcode or 0
        if code:
            log.warning("corral worker exited", worker=proc.name, code=code)
        worst = max(worst, abs(code))
    return worst
