"""Running corral under uvicorn (uvloop + httptools), with a graceful SIGTERM drain.

``serve --workers N`` runs N such servers as processes on one port: each binds its own
socket with SO_REUSEPORT (the kernel spreads connections over them) and is a whole corral
(its own listener protocol, drain, and cluster replica id), sharing slots and state with the
others through ``[cluster]``'s Redis. The parent only starts them, passes SIGTERM/SIGINT on
(each worker drains its own requests) and exits with the worst exit code. It also keeps a
private directory where each worker serves its own metrics on a unix socket, so that a
``/metrics`` scrape of any worker answers for the host (:mod:`corral.exposition`), and, under
systemd, relays the workers' readiness as its own (:class:`corral.workers.NotifyRelay`).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from corral.exposition import HostMetrics, serve_exposition
from corral.listener import ADMIN_HEADROOM, ConnectionGate, EdgeLimits, edge_protocol
from corral.logs import configure_logging
from corral.systemd import sd_notify
from corral.workers import NotifyRelay, Supervisor, WorkerPlan, plans, private_dir

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
        metrics_socket: str | None = None,
    ) -> None:
        super().__init__(config)
        self.corral = app
        self._drain_task: asyncio.Task[None] | None = None
        self.admin = _AdminServer(admin) if admin is not None else None
        self._admin_sockets = admin_sockets
        self._metrics_socket = metrics_socket

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve the main port, the admin listener beside it when there is one, and (a worker
        of ``serve --workers``) this process's metrics for its siblings."""
        async with contextlib.AsyncExitStack() as stack:
            if self._metrics_socket is not None:
                exposition = await serve_exposition(
                    self._metrics_socket, self.corral.runtime.metrics.render
                )
                stack.push_async_callback(_close_server, exposition)
            if self.admin is not None:
                admin = self.admin
                task = asyncio.create_task(admin.serve(self._admin_sockets), name="admin-listener")
                stack.push_async_callback(_stop_admin, admin, task)
            await super().serve(sockets)

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


async def _close_server(server: asyncio.AbstractServer) -> None:
    server.close()
    await server.wait_closed()


async def _stop_admin(admin: uvicorn.Server, task: asyncio.Task[None]) -> None:
    admin.should_exit = True
    await task


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


def build_server(settings: Settings, *, worker: WorkerPlan | None = None) -> CorralServer:
    """The server of one corral process; ``worker``: one of ``serve --workers`` (its admin
    listener shares the port, its /metrics answers for every worker)."""
    app = create_app(settings)
    if worker is not None:
        metrics = app.runtime.metrics
        workers = len(worker.metrics_sockets)
        metrics.host = HostMetrics(metrics.render, worker.siblings, workers=workers)
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
    if admin is not None and worker is not None:
        admin_sockets = [reuse_port_socket(admin.host, admin.port)]
    return CorralServer(
        uvicorn_config(app, settings, gate=gate),
        app,
        admin,
        admin_sockets,
        metrics_socket=worker.metrics_socket if worker is not None else None,
    )


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


def _follow(parent: int) -> None:
    """Tie a worker to the main process: signals reach it through the main process only (its
    own process group, so a terminal's Ctrl-C, sent to the whole group, does not arrive
    twice and cut the drain short), and it drains and exits if the main process dies."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(settings: Settings, plan: WorkerPlan, parent: int) -> None:
    """One worker process: a whole corral on a SO_REUSEPORT socket of the shared port."""
    _follow(parent)
    # Under systemd, readiness goes to the parent's relay (systemd hears the main process only).
    if plan.notify_socket is not None:
        os.environ["NOTIFY_SOCKET"] = plan.notify_socket
    else:
        os.environ.pop("NOTIFY_SOCKET", None)
    configure_logging(settings.server.log_level, settings.server.log_format)
    structlog.contextvars.bind_contextvars(worker=plan.number)
    server = build_server(settings, worker=plan)
    sock = reuse_port_socket(settings.server.host, settings.server.port)
    server.run(sockets=[sock])


def run_workers(settings: Settings, workers: int) -> int:
    """Run ``workers`` corral processes on one port; SIGTERM/SIGINT go to each of them (each
    drains). Returns the worst exit code."""
    if settings.server.port == 0:
        raise ValueError("--workers needs a fixed server.port (each worker binds it)")
    with private_dir() as directory:
        relay = NotifyRelay.open(directory)
        notify = relay.path if relay is not None else None
        try:
            supervisor = Supervisor(_worker, (settings,), plans(directory, workers, notify), relay)
            return supervisor.run()
        finally:
            if relay is not None:
                relay.close()
