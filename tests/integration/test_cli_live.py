"""The corral CLI as a user runs it: a real `corral serve` process in front of two simulators,
and `python -m corral ...` commands against it; their output and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.test_failover import poll
from tests.integration.test_serve import serve

pytestmark = pytest.mark.integration

KEY = "cli-live-admin-key"
GIB = 1024**3


class Corral:
    """A running ``corral serve`` and a way to run the CLI against it."""

    def __init__(self, url: str, sims: list[Any]) -> None:
        self.url = url
        self.sims = sims

    def env(self, key: str | None = KEY) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env["COLUMNS"] = "160"
        if key is not None:
            env["CORRAL_ADMIN_KEY"] = key
        return env

    def cli(self, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
        """``python -m corral ARGS --url URL`` with the admin key in CORRAL_ADMIN_KEY."""
        return subprocess.run(
            [sys.executable, "-m", "corral", *args, "--url", self.url],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env(key),
        )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 1 and exactly one `error: ...` line on stderr, no traceback; that line."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def row(output: str, *words: str) -> str:
    return next(line for line in output.splitlines() if all(w in line for w in words))


@pytest.fixture
def corral(tmp_path: Path, sim_factory: Any) -> Iterator[Corral]:
    """corral serve (admin key from a key file) in front of simulated H100 and L4 GPUs."""
    fast = sim_factory(name="fast", gpu_name="Simulated H100 80GB", vram_bytes=80 * GIB)
    slow = sim_factory(name="slow", gpu_name="Simulated L4 24GB", vram_bytes=24 * GIB)
    key_file = tmp_path / "admin.key"
    key_file.write_text(KEY + "\n")
    backends = "".join(
        f'[[backends]]\nid = "{bid}"\nurl = "{sim.url}"\nmax_concurrent = {slots}\n'
        f'gpu_metrics_url = "{sim.url}/_sim/dcgm"\n'
        for bid, sim, slots in (("gpu0", fast, 4), ("gpu1", slow, 2))
    )
    proc, url = serve(
        tmp_path,
        'log_level = "warning"\n[health]\ninterval_s = 0.5\n[gpu]\npoll_s = 0.5\n'
        f'[auth]\nadmin_key_file = "{key_file}"\n{backends}',
    )
    try:
        assert poll(lambda: _gpu_readings(url) == 2, 20, 0.05), proc.stderr
        yield Corral(url, [fast, slow])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


def _gpu_readings(url: str) -> int:
    """How many backends corral has a GPU reading for (0 until it is up and has polled)."""
    try:
        loads = httpx.get(
            f"{url}/api/v1/loadbalancer/loads", headers={"X-API-Key": KEY}, timeout=2
        ).json()["loads"]
    except (httpx.HTTPError, ValueError, KeyError):
        return 0
    return sum(bool(e["healthy"] and e["gpu_stats"]) for e in loads.values())


def test_status_strategy_gpus_and_models(corral: Corral) -> None:
    """status prints the load table with the queue and utilization lines; strategy shows and
    switches; gpus --url and models list what corral reads; each --json parses."""
    r = httpx.post(
        f"{corral.url}/api/generate",
        json={"model": "llama3.2", "prompt": "x", "stream": False},
        timeout=30,
    )
    assert r.status_code == 200
    served = r.headers["x-corral-backend"]

    out = ok(corral.cli("status"))
    header = row(out, "INSTANCE")
    for col in ("GPU", "HEALTH", "ACTIVE", "TOTAL", "AVG RT", "WEIGHT"):
        assert col in header
    gpu0, gpu1 = row(out, "│ gpu0"), row(out, "│ gpu1")
    assert "Simulated H100 80GB" in gpu0
    assert "/80.0 GiB" in gpu0
    assert "0/4" in gpu0
    assert "Simulated L4 24GB" in gpu1
    assert "0/2" in gpu1
    assert " up " in gpu0
    assert " up " in gpu1
    assert " 1 │" in row(out, f"│ {served}")
    assert "queue: 0 waiting" in out.splitlines()
    assert (
        "utilization: 0/6 slots (0%), 2/2 backends healthy, strategy least_connections, "
        "0 retried" in out.splitlines()
    )
    data = json.loads(ok(corral.cli("status", "--json")))
    assert sorted(data["loads"]) == ["gpu0", "gpu1"]
    assert data["loads"][served]["total_connections"] == 1
    assert data["stats"]["total_capacity"] == 6

    assert ok(corral.cli("strategy")).strip() == "least_connections"
    assert ok(corral.cli("strategy", "round_robin")).strip() == (
        "strategy changed from least_connections to round_robin"
    )
    assert json.loads(ok(corral.cli("strategy", "--json"))) == {"strategy": "round_robin"}
    assert "strategy round_robin" in ok(corral.cli("status"))
    line = failed(corral.cli("strategy", "nope"))
    assert line.startswith("error: 400: unknown strategy 'nope'; known: ")

    out = ok(corral.cli("gpus"))
    assert "gpu0" in row(out, "Simulated H100 80GB")
    assert "gpu1" in row(out, "Simulated L4 24GB")
    gpus = json.loads(ok(corral.cli("gpus", "--json")))
    assert sorted(g["name"] for g in gpus["gpus"]) == ["Simulated H100 80GB", "Simulated L4 24GB"]

    out = ok(corral.cli("models"))
    assert " gpu " in row(out, "llama3.2", served)
    models = json.loads(ok(corral.cli("models", "--json")))
    llama = next(m for m in models["models"] if m["name"] == "llama3.2:latest")
    assert llama["backends"][served]["resident"] == "gpu"


def test_backends_add_drain_enable_remove(corral: Corral, sim_factory: Any) -> None:
    """A backend added from the CLI is listed and probed; drain and enable show in status;
    remove takes it out, and a second remove is a one-line 404."""
    extra = sim_factory(name="extra")
    added = ok(corral.cli("backends", "add", "gpu2", extra.url, "--max-concurrent", "3"))
    assert added.strip() == "added gpu2 (" + extra.url + "): up, 0/3 in flight, weight 1"
    out = ok(corral.cli("backends"))
    assert extra.url in row(out, "│ gpu2")
    listed = json.loads(ok(corral.cli("backends", "list", "--json")))
    assert sorted(e["instance_id"] for e in listed["backends"]) == ["gpu0", "gpu1", "gpu2"]
    line = failed(corral.cli("backends", "add", "gpu2", extra.url))
    assert line == "error: 409: backend 'gpu2' already exists"

    assert ok(corral.cli("backends", "drain", "gpu2")).strip() == (
        "gpu2 draining: no new requests; 0 in flight will finish"
    )
    assert " draining " in row(ok(corral.cli("status")), "│ gpu2")
    assert json.loads(ok(corral.cli("backends", "drain", "gpu2", "--json")))["draining"] is True
    assert ok(corral.cli("backends", "enable", "gpu2")).strip() == (
        "gpu2 enabled: up, 0/3 in flight, weight 1"
    )
    assert " up " in row(ok(corral.cli("status")), "│ gpu2")

    assert ok(corral.cli("backends", "remove", "gpu2")).strip() == "removed gpu2"
    assert "gpu2" not in ok(corral.cli("status"))
    assert failed(corral.cli("backends", "remove", "gpu2")) == "error: 404: unknown backend 'gpu2'"
    assert failed(corral.cli("backends", "enable", "gpu2")) == "error: 404: unknown backend 'gpu2'"
    entry = json.loads(
        ok(corral.cli("backends", "add", "gpu3", extra.url, "--ttl", "60", "--json"))
    )
    assert (entry["instance_id"], entry["dynamic"]) == ("gpu3", True)
    assert json.loads(ok(corral.cli("backends", "remove", "gpu3", "--json"))) == {
        "removed": "gpu3",
        "in_flight": 0,
    }


def test_errors_are_one_line(corral: Corral) -> None:
    """No admin key, a wrong one, and a corral that is not there: one line each, exit 1."""
    how = "pass --admin-key KEY or set CORRAL_ADMIN_KEY"
    assert failed(corral.cli("status", key=None)) == (
        f"error: 401: this corral needs an admin key; {how}"
    )
    assert failed(corral.cli("backends", key="wrong")) == (
        f"error: 401: the admin key was refused (wrong key?); {how}"
    )
    gone = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "corral", "status", "--url", gone],
        capture_output=True,
        text=True,
        timeout=60,
        env=corral.env(),
    )
    assert failed(result).startswith(f"error: cannot reach corral at {gone}: ")


def test_status_watch_stops_on_ctrl_c(corral: Corral) -> None:
    """status --watch keeps refreshing until Ctrl-C, then exits 0 with the table shown."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "status", "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**corral.env(), "CORRAL_URL": corral.url},
    )
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        assert poll(lambda: any("Ctrl-C to stop" in line for line in said), 30), said
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
        reader.join(5)
        # Piped (not a terminal), the live display prints its last frame when it stops.
        out = proc.stdout.read()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == 0, "".join(said)
    assert "Traceback" not in "".join(said)
    assert f"corral at {corral.url}" in out
    assert " up " in row(out, "│ gpu0")
    assert "queue: 0 waiting" in out
