"""Run simulators for tests, the demo and benchmarks: in a thread (``SimThread``, in-process and
inspectable) or in a subprocess (``SimProcess``, killable like a real backend)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields
from types import TracebackType
from typing import IO, Any

import httpx
import uvicorn

from corral.sim.app import SimApp, create_sim_app
from corral.sim.config import SimConfig

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(
    url: str, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``GET url/`` until it answers 200; TimeoutError after ``timeout_s``, RuntimeError at
    once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1.0) as client:
        while True:
            try:
                if client.get(url.rstrip("/") + "/").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout_s} s")
            time.sleep(0.02)


def _flags(options: dict[str, Any]) -> list[str]:
    """CLI flags for keyword options: ``ttft_ms=5`` -> ``--ttft-ms 5``; True -> a bare flag;
    False/None -> nothing; lists -> comma-joined."""
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, list | tuple):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


class SimProcess:
    """``python -m corral.sim`` as a subprocess on 127.0.0.1; keyword options map to CLI flags
    (``SimProcess(name="gpu0", ttft_ms=5, hang=True)``). Use as a context manager."""

    def __init__(
        self, port: int | None = None, ready_timeout_s: float = 15.0, **options: Any
    ) -> None:
        self.port = port if port is not None else free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.options = options
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def start(self) -> SimProcess:
        """Start the process and wait until it answers."""
        # Kept open while the process runs (closed in _reap), so no context manager here.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "corral.sim",
            "--host",
            HOST,
            "--port",
            str(self.port),
            *_flags(self.options),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr)
        try:
            wait_ready(self.url, self.ready_timeout_s, self.proc)
        except Exception as exc:
            output = self._read_stderr()
            self.stop()
            raise RuntimeError(f"simulator on {self.url} did not start: {exc}\n{output}") from exc
        return self

    def _read_stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL, like a crashed backend (no graceful close of connections)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 5 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def restart(self) -> None:
        """Start again on the same port (stopping first if still running)."""
        self.stop()
        self.start()

    def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats``."""
        return self._call("GET", "/_sim/stats")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """``PUT /_sim/faults`` with a partial update; returns the faults now in force."""
        return self._call("PUT", "/_sim/faults", faults)

    def set_config(self, **changes: Any) -> dict[str, Any]:
        """``PUT /_sim/config`` (ttft_s, token_interval_s, tokens, load_s, num_parallel, ...)."""
        return self._call("PUT", "/_sim/config", changes)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = httpx.request(method, self.url + path, json=body, timeout=5.0)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class PromptServer(uvicorn.Server):
    """A uvicorn.Server that notices a stop at once (uvicorn looks every 0.1 s): a test that
    starts a few servers no longer waits tenths of a second for each at its end."""

    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def stop_soon(self) -> None:
        """Ask it to exit, from any thread; returns at once."""
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop.call_soon_threadsafe(wake.set)


class SimThread:
    """A simulator under uvicorn on a background thread with its own event loop, on a free
    port. ``.app.config`` is the live configuration; ``.app.sim`` its state."""

    def __init__(self, config: SimConfig | None = None, **overrides: Any) -> None:
        config = config if config is not None else SimConfig()
        known = {f.name for f in fields(SimConfig)}
        for key, value in overrides.items():
            if key not in known:
                raise TypeError(f"unknown SimConfig field {key!r}")
            setattr(config, key, value)
        self.app: SimApp = create_sim_app(config)
        self.port = 0
        self.url = ""
        self._server: PromptServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def config(self) -> SimConfig:
        """The live configuration."""
        return self.app.config

    def start(self) -> SimThread:
        """Bind a free port, serve on it from a new thread, return once it accepts requests."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            http="httptools",
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=1,
        )
        self._server = server = PromptServer(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"sim-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"simulator thread on port {self.port} did not start")
            time.sleep(0.005)
        return self

    def stop_soon(self) -> None:
        """Ask the server to exit; :meth:`stop` waits for it."""
        if self._server is not None:
            self._server.stop_soon()

    def stop(self) -> None:
        """Ask the server to exit and wait for its thread."""
        self.stop_soon()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats`` (over HTTP: the state belongs to the server's thread)."""
        resp = httpx.get(self.url + "/_sim/stats", timeout=5.0)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def set_faults(self, **faults: Any) -> None:
        """Change faults in place (each a single attribute store, safe across threads)."""
        self.app.config.faults.update(faults)

    def __enter__(self) -> SimThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
