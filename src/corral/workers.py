"""``serve --workers``: the main process, and what it shares with its workers.

:class:`Supervisor` starts the workers, passes SIGTERM/SIGINT on to them (each drains), starts a
new worker in place of one that died (unless they keep dying at once: then it stops them all),
and returns the worst exit code once every worker has stopped. The parent makes one private
directory (mode 0700, removed when it exits) holding a unix socket
per worker, on which that worker serves its own metrics (:mod:`corral.exposition` merges them
into one host's ``/metrics``), and, under systemd, the datagram socket of a :class:`NotifyRelay`:
systemd (``NotifyAccess=main``) hears only the main process, so the workers report to the
parent and the parent speaks for them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from corral.systemd import sd_notify

log = structlog.get_logger("corral")

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# A unix socket's path holds at most 107 bytes; the longest name put in the directory is
# "/metrics-NNN.sock".
_MAX_DIR_BYTES = 107 - len("/metrics-000.sock")


@dataclass(frozen=True)
class WorkerPlan:
    """What worker ``number`` is handed (picklable, for a spawned process)."""

    number: int
    metrics_sockets: tuple[str, ...]  # every worker's, by number
    notify_socket: str | None  # the parent's relay; None outside systemd

    @property
    def metrics_socket(self) -> str:
        return self.metrics_sockets[self.number]

    @property
    def siblings(self) -> tuple[str, ...]:
        return tuple(p for n, p in enumerate(self.metrics_sockets) if n != self.number)


@contextlib.contextmanager
def private_dir() -> Iterator[Path]:
    """A directory only this user can enter (mkdtemp makes it 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="corral-"))
    if len(os.fsencode(path)) > _MAX_DIR_BYTES:  # too long a $TMPDIR for socket names
        path.rmdir()
        path = Path(tempfile.mkdtemp(prefix="corral-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def plans(directory: Path, workers: int, notify_socket: str | None) -> list[WorkerPlan]:
    paths = tuple(str(directory / f"metrics-{n}.sock") for n in range(workers))
    return [WorkerPlan(n, paths, notify_socket) for n in range(workers)]


class NotifyRelay:
    """The workers' ``$NOTIFY_SOCKET``: sends ``READY=1`` on to systemd once every worker has
    said it, and ``STOPPING=1`` the first time a worker (or the parent) says it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # The sender's pid rides along with each datagram, as systemd reads it.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self._workers: set[int] = set()
        self._ready: set[int] = set()
        self.ready = False
        self.stopped = False

    @classmethod
    def open(cls, directory: Path) -> NotifyRelay | None:
        """A relay when the parent runs under systemd (``$NOTIFY_SOCKET`` set), else None."""
        return cls(directory / "notify") if os.environ.get("NOTIFY_SOCKET") else None

    def fileno(self) -> int:
        return self.sock.fileno()

    def expect(self, pids: list[int]) -> None:
        """The workers whose ``READY=1`` systemd waits for."""
        self._workers = set(pids)

    def replaced(self, old: int | None, new: int | None) -> None:
        """Worker ``old`` died and ``new`` took its place: before systemd has heard READY=1,
        it waits for the new one instead."""
        if not self.ready:
            self._workers.discard(old)
            self._ready.discard(old)
            if new is not None:
                self._workers.add(new)

    def receive(self) -> None:
        """Handle every datagram waiting on the socket."""
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            self.handle(data, pid)

    def handle(self, data: bytes, pid: int | None) -> None:
        states = data.decode(errors="replace").split("\n")
        if "STOPPING=1" in states:
            self.stopping()
        if "READY=1" in states and pid in self._workers:
            self._ready.add(pid)
            if self._ready >= self._workers and not self.ready and not self.stopped:
                self.ready = True
                sd_notify("READY=1")
                log.info("corral workers ready", workers=len(self._workers))

    def stopping(self) -> None:
        if not self.stopped:
            self.stopped = True
            sd_notify("STOPPING=1")

    def close(self) -> None:
        self.sock.close()


# A worker that dies within this long of its start, this many times in a row, is not started
# again: the whole host stops (a bad config or a taken port would otherwise loop forever).
QUICK_DEATH_S = 10.0
QUICK_DEATHS = 3


class Supervisor:
    """The main process of ``serve --workers``."""

    def __init__(
        self,
        target: Callable[..., None],
        args: tuple[Any, ...],
        plans: list[WorkerPlan],
        relay: NotifyRelay | None,
    ) -> None:
        self._target = target
        self._args = args  # target(*args, plan, parent pid)
        self._plans = plans
        self._relay = relay
        self._context = multiprocessing.get_context("spawn")
        self._procs: dict[int, tuple[BaseProcess, WorkerPlan]] = {}  # sentinel -> worker
        self._started: dict[int, float] = {}  # plan number -> when its worker started
        self._quick: dict[int, int] = {}  # plan number -> quick deaths in a row
        self.stopping = False
        self.worst = 0

    def run(self) -> int:
        for plan in self._plans:
            self._start(plan)
        pids = [p.pid for p, _ in self._procs.values() if p.pid is not None]
        if self._relay is not None:
            self._relay.expect(pids)
        log.info("corral workers started", workers=len(pids), pids=pids)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        while self._procs:
            waiting: list[Any] = [*self._procs]
            if self._relay is not None:
                waiting.append(self._relay.sock)
            for ready in multiprocessing.connection.wait(waiting):
                if isinstance(ready, int):
                    self._ended(ready)
                elif self._relay is not None:
                    self._relay.receive()
        return self.worst

    def _start(self, plan: WorkerPlan) -> BaseProcess:
        proc = self._context.Process(
            target=self._target,
            args=(*self._args, plan, os.getpid()),
            name=f"corral-worker-{plan.number}",
        )
        proc.start()
        self._procs[proc.sentinel] = (proc, plan)
        self._started[plan.number] = time.monotonic()
        return proc

    def _ended(self, sentinel: int) -> None:
        proc, plan = self._procs.pop(sentinel)
        number = plan.number
        proc.join()
        code = proc.exitcode or 0
        if self.stopping:
            if code:
                log.warning("corral worker exited", worker=proc.name, code=code)
            self.worst = max(self.worst, abs(code))
            return
        quick = time.monotonic() - self._started[number] < QUICK_DEATH_S
        self._quick[number] = self._quick.get(number, 0) + 1 if quick else 1
        if self._quick[number] >= QUICK_DEATHS:
            log.error(
                "corral worker keeps exiting at once; stopping every worker",
                worker=proc.name,
                code=code,
            )
            self.worst = max(self.worst, abs(code) or 1)
            self._forward(signal.SIGTERM, None)
            return
        log.warning("corral worker died; starting another", worker=proc.name, code=code)
        replacement = self._start(plan)
        if self._relay is not None:
            self._relay.replaced(proc.pid, replacement.pid)

    def _forward(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self._relay is not None:
            self._relay.stopping()
        for proc, _ in self._procs.values():
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
