"""A real redis-server per test on a free loopback port (with a password), and replicas of a
corral cluster talking to it: in this process (``cluster_factory``) or in a subprocess that a
test can SIGKILL (``replica_process``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from corral.cluster import Cluster
from corral.config import ClusterSettings
from tests.helpers import free_port

REDIS_SERVER = shutil.which("redis-server")
PASSWORD = "s3cret-Pa55word-for-tests"
LEASE_S = 1.0
ROOT = Path(__file__).resolve().parents[2]


class RedisServer:
    """One redis-server process: no persistence, a password, loopback only."""

    def __init__(self, executable: str, password: str = PASSWORD) -> None:
        self.executable = executable
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def listen_args(self) -> list[str]:
        """Where redis-server listens (a subclass may listen with TLS)."""
        return ["--port", str(self.port)]

    def connect(self) -> socket.socket:
        """A connection to it, as a client makes it."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=0.5)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.executable,
                *self.listen_args(),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--requirepass", self.password,
                "--logfile", "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.answers():
            assert self.proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer in 10 s"
            time.sleep(0.01)
        return self

    def answers(self) -> bool:
        """AUTH and PING succeed (a raw RESP exchange: no client library involved)."""
        try:
            with self.connect() as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while b"PONG" not in reply and b"-" not in reply:
                    chunk = sock.recv(100)
                    if not chunk:
                        return False
                    reply += chunk
                return b"+OK\r\n+PONG\r\n" in reply
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test froze it
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a Redis that hangs)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def settings(url: str, *, name: str = "fleet", lease_s: float = LEASE_S) -> ClusterSettings:
    # model_construct: no Settings around it (the URL is checked by Cluster itself).
    return ClusterSettings.model_construct(redis_url=SecretStr(url), name=name, lease_s=lease_s)


ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def cluster_factory(redis_server: RedisServer) -> AsyncIterator[ClusterFactory]:
    """Start replicas in this process: ``await cluster_factory(**Cluster options)``, joined
    and running; stopped in reverse order at the end."""
    started: list[tuple[Cluster, asyncio.Task[None]]] = []

    async def start(
        *, url: str | None = None, name: str = "fleet", lease_s: float = LEASE_S, **options: Any
    ) -> Cluster:
        cluster = Cluster(settings(url or redis_server.url, name=name, lease_s=lease_s), **options)
        await cluster.connect()
        task = asyncio.create_task(cluster.run())
        started.append((cluster, task))
        return cluster

    yield start
    for cluster, task in reversed(started):
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cluster.close()


class ReplicaProcess:
    """``python -m tests.cluster.replica``: a replica a test can SIGKILL."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ready(self, timeout_s: float = 10) -> str:
        """Its "ready REPLICA" line (after its log lines); the replica id."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while not (line := await self.proc.stdout.readline()).startswith(b"ready "):
                assert line, "the replica exited before it was ready"
        return line.split()[1].decode()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def replica_process(redis_server: RedisServer) -> AsyncIterator[Any]:
    started: list[ReplicaProcess] = []

    async def start(*args: str) -> ReplicaProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.cluster.replica",
            *args,
            cwd=ROOT,
            env={**os.environ, "CORRAL_TEST_REDIS_URL": redis_server.url},
            stdout=asyncio.subprocess.PIPE,
        )
        replica = ReplicaProcess(proc)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.kill()
