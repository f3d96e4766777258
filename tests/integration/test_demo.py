"""`corral demo` as a user runs it: a real process, its printed table, Ctrl-C to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from tests.helpers import free_port, poll

pytestmark = pytest.mark.integration


def test_demo_shows_both_simulated_gpus_and_stops_on_ctrl_c() -> None:
    """The demo's table lists gpu0 and gpu1 with their simulated GPUs, VRAM and VRAM weights;
    the GPU admin route answers; Ctrl-C ends it with exit code 0."""
    port = free_port()
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        assert poll(lambda: any("Press Ctrl-C" in ln for ln in lines), 30), "".join(lines)
        gpu0 = next(ln for ln in lines if ln.startswith("│ gpu0"))
        gpu1 = next(ln for ln in lines if ln.startswith("│ gpu1"))
        assert "Simulated H100 80GB" in gpu0
        assert "/80.0 GiB" in gpu0
        assert "Simulated L4 24GB" in gpu1
        assert "/24.0 GiB" in gpu1
        # VRAM-derived weights: 80 GB → 3, 24 GB → 1.5.
        assert " 3 │" in gpu0
        assert " 1.5 │" in gpu1
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            gpus = client.get("/api/v1/loadbalancer/gpus").json()["gpus"]
            assert sorted(g["backends"][0] for g in gpus) == ["gpu0", "gpu1"]
            assert 'corral_gpu_memory_total_bytes{backend="gpu0"' in client.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(15)
        reader.join(5)
        proc.stdout.close()  # type: ignore[union-attr]
    assert code == 0, "".join(lines[-20:])
