"""``corral serve --workers 2`` as a subprocess with a real redis-server: systemd hears one
READY=1 from the main process once every worker is ready, and a /metrics scrape of whichever
worker the kernel picks answers for the whole host."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.conftest import RedisServer
from tests.helpers import free_port, poll
from tests.integration.test_cluster_live import LEASE_S, kill, spray

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (unix socket paths are capped at 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="cw") as path:
        yield Path(path)


def serve_workers(
    tmp_path: Path,
    redis: RedisServer,
    backends: str,
    env: dict[str, str],
    health: str = "interval_s = 0.2\ntimeout_s = 1\n",
    port: int | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``corral serve --workers 2`` on ``port`` (a free one by default), not yet waited for."""
    port = port or free_port()
    config = tmp_path / "workers.toml"
    config.write_text(
        f'[server]\nport = {port}\nlog_level = "warning"\n[health]\n{health}'
        f'[cluster]\nredis_url = "{redis.url}"\nname = "w"\nlease_s = {LEASE_S}\n{backends}'
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    base.pop("NOTIFY_SOCKET", None)
    with (tmp_path / "stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", "--config", str(config), "--workers", "2"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**base, **env},
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}"


def sim_backend(bid: str, url: str, max_concurrent: int = 2) -> str:
    return (
        f'[[backends]]\nid = "{bid}"\nurl = "{url}"\nmax_concurrent = {max_concurrent}\n'
        "max_loaded_models = 1\n"
    )


def answers(url: str, timeout_s: float = 0.5) -> bool:
    """A fresh connection's /readyz answers 200 within ``timeout_s``."""
    try:
        return httpx.get(f"{url}/readyz", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def workers_host(
    tmp_path: Path, short_dir: Path, redis: RedisServer, sim: Any
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``serve --workers 2`` in front of ``sim`` (8 slots), both workers answering; stopped
    at the end."""
    env = {"TMPDIR": str(short_dir)}
    proc, url = serve_workers(tmp_path, redis, sim_backend("gpu0", sim.url, 8), env)
    try:
        assert poll(lambda: all(answers(url, 2) for _ in range(8)), 20)
        yield proc, url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        finally:
            kill(proc)


# systemd's side ------------------------------------------------------------------------------


class Systemd:
    """A NOTIFY_SOCKET as systemd reads it: datagrams with their sender's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))

    def receive(self, timeout_s: float) -> tuple[bytes, int] | None:
        """The next message and the pid that sent it; None when nothing came in time."""
        self.sock.settimeout(timeout_s)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        [(level, kind, cred)] = ancdata
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        pid, _, _ = struct.unpack("3i", cred[:12])
        return data, pid

    def close(self) -> None:
        self.sock.close()


class Gate:
    """A backend that holds the first connection it gets until released (the worker that
    made it stays in its first health round) and closes every other one at once."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Gate:
        self._thread.start()
        return self

    def _run(self) -> None:
        first = True
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if first:
                first = False
                threading.Thread(target=self._hold, args=(conn,), daemon=True).start()
            else:
                conn.close()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(4096)  # the probe's request
            self.held.set()
            self._release.wait()

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        self.listener.close()


def test_systemd_hears_one_ready_from_the_main_process(
    tmp_path: Path, short_dir: Path, redis_server: RedisServer, sim_factory: Any
) -> None:
    """Under Type=notify with NotifyAccess=main: one READY=1, sent by the parent's pid, only
    once both workers are ready (one is held in its first health round meanwhile); SIGTERM
    brings STOPPING=1 from the parent, and its private directory (0700) is gone at exit."""
    sim, gate = sim_factory(name="a"), Gate().start()
    systemd = Systemd(short_dir / "notify")
    tmpdir = short_dir / "tmp"
    tmpdir.mkdir()
    backends = sim_backend("gpu0", sim.url) + sim_backend("gate", gate.url)
    env = {"NOTIFY_SOCKET": str(systemd.path), "TMPDIR": str(tmpdir)}
    proc, url = serve_workers(
        tmp_path, redis_server, backends, env, health="interval_s = 0.2\ntimeout_s = 8\n"
    )
    try:
        assert gate.held.wait(20), "no worker probed the gate"
        # The other worker serves (and has told the parent so); systemd has heard nothing.
        assert poll(lambda: answers(url), 20), "no worker became ready"
        assert systemd.receive(0.5) is None
        [private] = tmpdir.iterdir()
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        names = {p.name for p in private.iterdir()}
        assert names == {"notify", "metrics-0.sock", "metrics-1.sock"}

        gate.release()
        assert systemd.receive(10) == (b"READY=1", proc.pid)
        assert all(answers(url, 2) for _ in range(8))  # both workers answer now

        proc.send_signal(signal.SIGTERM)
        assert systemd.receive(10) == (b"STOPPING=1", proc.pid)
        assert proc.wait(20) == 0
        assert systemd.receive(0.2) is None  # exactly one READY=1 and one STOPPING=1
        assert list(tmpdir.iterdir()) == []
    finally:
        stop(proc)
        gate.stop()
        systemd.close()


# /metrics ------------------------------------------------------------------------------------


def requests_total(text: str) -> tuple[float, float | None]:
    """corral_requests_total summed over its label sets, and corral_workers_scraped."""
    total, scraped = 0.0, None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "corral_requests_total":
                total += sample.value
            elif sample.name == "corral_workers_scraped":
                scraped = sample.value
    return total, scraped


def own_exposition(path: Path) -> str:
    """One worker's own metrics, read from its socket in the private directory."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def test_every_scrape_counts_the_whole_host(
    tmp_path: Path, short_dir: Path, redis_server: RedisServer, sim_factory: Any
) -> None:
    """Requests on fresh connections land on both workers; every /metrics scrape, whichever
    worker answers it, counts all of them so far (never fewer than the scrape before), and
    all N once they are done."""
    sim = sim_factory(name="a", token_interval_s=0.002, tokens=4, num_parallel=16)
    with workers_host(tmp_path, short_dir, redis_server, sim) as (_, url):
        n = 60
        seen: list[tuple[float, float | None]] = []
        with ThreadPoolExecutor(1) as load:
            running = load.submit(spray, [url], n, 8)
            while not running.done():
                seen.append(requests_total(httpx.get(f"{url}/metrics", timeout=5).text))
            assert running.result() == [200] * n
        for _ in range(10):
            seen.append(requests_total(httpx.get(f"{url}/metrics", timeout=5).text))
        [private] = short_dir.iterdir()
        own = [requests_total(own_exposition(private / f"metrics-{i}.sock"))[0] for i in (0, 1)]
        assert all(count > 0 for count in own), own  # both workers served some
        assert sum(own) == n
        complete = [total for total, scraped in seen if scraped == 2]
        assert len(complete) >= len(seen) - 2, seen  # a sibling rarely misses 250 ms
        assert complete == sorted(complete), seen
        assert complete[-10:] == [n] * 10


# Stopping ------------------------------------------------------------------------------------


def stream_to_the_end(url: str) -> bool:
    """One streamed generate on a fresh connection: True when its last line says done."""
    body = {"model": "llama3.2", "prompt": "hi"}
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=20) as response:
        lines = [line for line in response.iter_lines() if line.strip()]
    return response.status_code == 200 and '"done":true' in lines[-1].replace(" ", "")


def test_ctrl_c_reaches_the_process_group_and_every_worker_still_drains(
    tmp_path: Path, short_dir: Path, redis_server: RedisServer, sim_factory: Any
) -> None:
    """Ctrl-C in a terminal signals the whole process group (and systemd's default
    KillMode=control-group signals every process of the unit): each worker must drain its
    streams once, not take the parent's forwarded signal as a second Ctrl-C and cut them."""
    sim = sim_factory(name="a", token_interval_s=0.06, tokens=20, num_parallel=16)
    with workers_host(tmp_path, short_dir, redis_server, sim) as (proc, url):
        with ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream_to_the_end, url) for _ in range(8)]
            assert poll(lambda: sim.stats()["in_flight"] >= 8, 10)
            groups = {os.getpgid(pid) for pid in worker_pids(proc.pid)}
            assert len(groups) == 2  # each worker its own group
            assert os.getpgid(proc.pid) not in groups  # the group's Ctrl-C reaches the parent
            os.killpg(proc.pid, signal.SIGINT)  # as the terminal does
            assert [s.result() for s in streams] == [True] * 8
        assert proc.wait(20) == 0


def test_workers_stop_when_the_main_process_is_killed(
    tmp_path: Path, short_dir: Path, redis_server: RedisServer, sim_factory: Any
) -> None:
    """SIGKILL of the main process (nothing can forward anything) leaves no worker serving
    the port: each one drains and exits on its own."""
    sim = sim_factory(name="a")
    with workers_host(tmp_path, short_dir, redis_server, sim) as (proc, url):
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait(5)
        assert poll(lambda: not any(_alive(p) for p in workers), 15)
        assert not answers(url, 0.5)


def worker_pids(parent: int) -> list[int]:
    """The worker processes of ``parent`` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_worker_that_dies_is_replaced(
    tmp_path: Path, short_dir: Path, redis_server: RedisServer, sim_factory: Any
) -> None:
    """A worker killed (a crash, the OOM killer) is replaced, as nginx and gunicorn replace
    theirs: the host is back to two workers, and /metrics hears both again."""
    sim = sim_factory(name="a")
    with workers_host(tmp_path, short_dir, redis_server, sim) as (proc, url):
        first = worker_pids(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        assert poll(lambda: len(set(worker_pids(proc.pid)) - {first[0]}) == 2, 20)
        assert poll(lambda: requests_scraped(url) == 2, 20)
        assert proc.poll() is None
    assert proc.returncode == 0


def requests_scraped(url: str) -> float | None:
    try:
        return requests_total(httpx.get(f"{url}/metrics", timeout=2).text)[1]
    except httpx.HTTPError:
        return None


def test_workers_that_cannot_start_stop_the_host(
    tmp_path: Path, short_dir: Path, redis_server: RedisServer, sim_factory: Any
) -> None:
    """A worker that exits at once, again and again (here: the port is taken by a socket that
    does not share it), is not restarted forever: the main process stops with an error."""
    sim = sim_factory(name="a")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        env = {"TMPDIR": str(short_dir)}
        proc, _ = serve_workers(
            tmp_path,
            redis_server,
            sim_backend("gpu0", sim.url, 8),
            env,
            port=taken.getsockname()[1],
        )
        try:
            assert proc.wait(60) != 0
        finally:
            stop(proc)
    assert b"keeps exiting at once" in (tmp_path / "stderr").read_bytes()
