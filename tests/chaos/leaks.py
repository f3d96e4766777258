"""Leak checks on an in-thread corral: its asyncio tasks, the sockets it holds, its upstream
pool, its slots and its queue, read on its own event loop and compared with a baseline."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.chaos.support import poll

_TCP_LISTEN = "0A"


def _open_tcp_sockets() -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket this process holds open."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[9] in inodes:
                local = int(cols[1].rsplit(":", 1)[1], 16)
                remote = int(cols[2].rsplit(":", 1)[1], 16)
                found.append((local, remote, cols[3]))
    return found


@dataclass
class Snapshot:
    """corral's loose ends at one moment, read on its own event loop."""

    tasks: Counter[str]
    client_sockets: int  # accepted connections to corral
    upstream_sockets: int  # connections from this process to a backend port
    pooled_idle: int  # connected idle connections in the upstream pool
    acquired: int  # upstream connections in use
    in_flight: dict[str, int]
    queued: int


def _label(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or repr(coro)


class LeakCheck:
    """Counts corral's asyncio tasks, client and upstream sockets, pool and slots, and compares
    them with a baseline taken before the chaos."""

    def __init__(self, corral: Any, backend_ports: Iterable[int]) -> None:
        self.corral = corral
        self.backend_ports = set(backend_ports)
        self.baseline: Counter[str] = Counter()

    def snapshot(self) -> Snapshot:
        runtime = self.corral.runtime
        corral_port = self.corral.port
        ports = self.backend_ports

        def read() -> Snapshot:
            current = asyncio.current_task()
            tasks = Counter(_label(t) for t in asyncio.all_tasks() if t is not current)
            idle, acquired = runtime.upstream.transport.pool_stats()
            sockets = _open_tcp_sockets()
            return Snapshot(
                tasks=tasks,
                client_sockets=sum(
                    1 for lp, _, st in sockets if lp == corral_port and st != _TCP_LISTEN
                ),
                upstream_sockets=sum(1 for _, rp, _ in sockets if rp in ports),
                pooled_idle=idle,
                acquired=acquired,
                in_flight={b.id: b.in_flight for b in runtime.registry.all()},
                queued=runtime.admission.queued,
            )

        result: Snapshot = self.corral.call(read)
        return result

    def take_baseline(self) -> None:
        """The long-lived tasks: those present in each of a few samples (probes come and go)."""
        counts = self.snapshot().tasks
        for _ in range(4):
            time.sleep(0.03)
            counts &= self.snapshot().tasks
        self.baseline = counts

    def problems(self, snap: Snapshot) -> list[str]:
        found = []
        if snap.tasks != self.baseline:
            extra = snap.tasks - self.baseline
            missing = self.baseline - snap.tasks
            found.append(f"tasks differ: extra {dict(extra)}, missing {dict(missing)}")
        if snap.client_sockets:
            found.append(f"{snap.client_sockets} client connections still open")
        if snap.acquired:
            found.append(f"{snap.acquired} upstream connections still acquired")
        if snap.upstream_sockets != snap.pooled_idle:
            found.append(
                f"{snap.upstream_sockets} upstream sockets open but {snap.pooled_idle} idle in "
                "the pool (a connection outside the pool)"
            )
        if any(snap.in_flight.values()):
            found.append(f"slots still held: {snap.in_flight}")
        if snap.queued:
            found.append(f"{snap.queued} requests still queued")
        return found

    def assert_clean(self, timeout_s: float = 5.0) -> None:
        """Poll until nothing is left over (every client closed); fail with what remains."""
        last: list[str] = []

        def clean() -> bool:
            nonlocal last
            last = self.problems(self.snapshot())
            return not last

        assert poll(clean, timeout_s, 0.02), "leaks after the load settled:\n  " + "\n  ".join(last)
        with self.corral.client(timeout=5) as client:
            text = client.get("/metrics").text
        gauges = [
            line
            for line in text.splitlines()
            if line.startswith("corral_backend_in_flight{") and float(line.rsplit(" ", 1)[1])
        ]
        assert not gauges, f"in-flight gauges not back to 0: {gauges}"
