"""`corral serve` as a real process: config file, JSON access log, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.test_failover import poll

pytestmark = pytest.mark.integration


def test_serve_process_with_config(tmp_path: Path, sim_factory: Any) -> None:
    """corral serve --config FILE proxies, logs one JSON access line, and exits on SIGTERM."""
    sim = sim_factory(name="a")
    port = free_port()
    config = tmp_path / "corral.toml"
    config.write_text(
        f"[server]\nport = {port}\n[health]\ninterval_s = 0.5\n"
        f'[[backends]]\nid = "gpu0"\nurl = "{sim.url}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert poll(ready, 15, 0.05), proc.stderr.read1().decode() if proc.stderr else ""
        r = httpx.post(
            f"{url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
        )
        assert r.status_code == 200
        assert r.headers["x-corral-backend"] == "gpu0"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    # uvicorn re-raises SIGTERM after its graceful shutdown (systemd counts that as clean).
    assert proc.returncode in (0, -signal.SIGTERM)
    assert '"event": "corral stopped"' in err.decode()
    access = [
        json.loads(line) for line in err.decode().splitlines() if '"event": "request"' in line
    ]
    assert len(access) == 1
    line = access[0]
    assert (line["backend"], line["model"], line["status"], line["attempts"]) == (
        "gpu0",
        "llama3.2",
        200,
        1,
    )
    assert line["tokens"] == 16
    assert line["ttft_s"] > 0
    assert line["duration_s"] >= line["ttft_s"]


def test_serve_with_invalid_config_exits_2(tmp_path: Path) -> None:
    """An invalid config stops start-up with exit code 2 and says what is wrong."""
    config = tmp_path / "bad.toml"
    config.write_text("[timeouts]\nconnect_s = -1\n")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--config", str(config)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "timeouts.connect_s" in result.stderr.decode()
    assert time.monotonic() - started < 30
