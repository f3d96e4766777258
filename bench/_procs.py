"""Subprocesses of the benchmark: started in their own session, always stopped; tools found or
installed from Debian's packages; readiness polled, never slept on."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the results."""
    print(msg, file=sys.stderr, flush=True)


def die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if this benchmark dies without cleaning up (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def preexec(cpus: set[int] | None = None) -> Callable[[], None]:
    """preexec_fn: :func:`die_with_parent`, and run on ``cpus`` only when given (its threads
    and children inherit the mask)."""

    def setup() -> None:
        die_with_parent()
        if cpus:
            with contextlib.suppress(AttributeError, OSError):
                os.sched_setaffinity(0, cpus)

    return setup


@dataclass
class Proc:
    """A subprocess in its own session, its output in a log file, killed on stop()."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    cpus: set[int] | None = None  # pinned to these CPUs (None: wherever the kernel likes)

    def start(self) -> Proc:
        with self.log_path.open("wb") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env,
                start_new_session=True,
                preexec_fn=preexec(self.cpus),
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        else:
            # The leader exited; take down anything left in its group (nginx workers).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def run_bounded(argv: list[str], timeout_s: float, cpus: set[int] | None = None) -> str:
    """Run a command to completion within ``timeout_s`` (on ``cpus`` when given); its stdout.
    Killed on any exit path."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=preexec(cpus),
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(argv[0]).name} exited {proc.returncode}: {err.decode(errors='replace')[-800:]}"
        )
    return out.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, timeout_s: float = 2.0) -> int:
    """Status of one request; 0 when the server did not answer."""
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return 0


def wait_until(check: Callable[[], bool], proc: Proc, what: str, timeout_s: float = 30) -> None:
    """Poll ``check`` until true; fail early if ``proc`` died, and after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited while starting:\n{proc.tail()}")
        if check():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise RuntimeError(f"{what} not ready after {timeout_s:g}s:\n{proc.tail()}")


def find_or_install(binary: str, packages: list[str], allow_install: bool) -> str | None:
    """Path of ``binary``; else try Debian's packages in turn (root only). None if absent."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if found or not allow_install:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log(f"{binary}: not installed and cannot apt-get here (needs root on Debian)")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for update_first in (False, True):
        if update_first:
            log("apt-get update ...")
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    ["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300
                )
        for pkg in packages:
            log(f"apt-get install -y {pkg} ...")
            try:
                done = subprocess.run(
                    ["apt-get", "install", "-y", "-qq", pkg],
                    env=env,
                    capture_output=True,
                    timeout=300,
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
            if done.returncode == 0 and found:
                return found
    log(f"{binary}: could not be installed; skipping what needs it")
    return None


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "?"
