"""`corral serve` as a real process: config file, JSON access log, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port, poll

pytestmark = pytest.mark.integration


def serve(tmp_path: Path, toml: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``corral serve`` on a free port with ``toml`` (plus [server] port) as its config."""
    port = free_port()
    config = tmp_path / "corral.toml"
    config.write_text(f"[server]\nport = {port}\n{toml}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    return proc, f"http://127.0.0.1:{port}"


def test_serve_process_with_config(tmp_path: Path, sim_factory: Any) -> None:
    """corral serve --config FILE proxies, logs one JSON access line, and exits on SIGTERM."""
    sim = sim_factory(name="a")
    proc, url = serve(
        tmp_path,
        f'[health]\ninterval_s = 0.5\n[[backends]]\nid = "gpu0"\nurl = "{sim.url}"\n',
    )
    try:
        assert poll(lambda: _ready(url), 15, 0.05)
        r = httpx.post(
            f"{url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
        )
        assert r.status_code == 200
        assert r.headers["x-corral-backend"] == "gpu0"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
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


def test_sigterm_drains_live_streams(tmp_path: Path, sim_factory: Any) -> None:
    """SIGTERM during 10 live streams: all 10 finish, new requests get 503, exit code 0."""
    sim = sim_factory(name="a", token_interval_s=0.05, tokens=30)
    proc, url = serve(
        tmp_path,
        f'log_level = "warning"\n[[backends]]\nid = "gpu0"\nurl = "{sim.url}"\n'
        "max_concurrent = 16\n",
    )
    results: list[list[dict[str, Any]]] = []
    started = threading.Semaphore(0)

    def stream() -> None:
        with (
            httpx.Client(base_url=url, timeout=30) as client,
            client.stream(
                "POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}
            ) as resp,
        ):
            lines = []
            for line in resp.iter_lines():
                if not lines:
                    started.release()
                lines.append(json.loads(line))
            results.append(lines)

    threads = [threading.Thread(target=stream) for _ in range(10)]
    try:
        assert poll(lambda: _ready(url), 15, 0.05)
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert poll(lambda: _status(url, "/readyz") == 503, 5)
        with httpx.Client(base_url=url, timeout=5) as client:
            r = client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert "shutting down" in r.json()["error"]
        for t in threads:
            t.join(20)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert len(results) == 10
    for lines in results:
        assert lines[-1]["done"] is True
        assert lines[-1]["eval_count"] == 30


def _status(url: str, path: str) -> int | None:
    try:
        return httpx.get(url + path, timeout=1).status_code
    except httpx.HTTPError:
        return None


def _ready(url: str) -> bool:
    return _status(url, "/readyz") == 200


def test_admin_port_moves_admin_metrics_and_ui_to_a_loopback_listener(
    tmp_path: Path, sim_factory: Any
) -> None:
    """With server.admin_port the main port serves Ollama routes, /healthz and /readyz only;
    the admin API, /metrics and /ui answer on the admin listener (/docs on neither: off by
    default); SIGTERM stops both."""
    sim = sim_factory(name="a")
    admin_port = free_port()
    proc, url = serve(
        tmp_path,
        f'admin_port = {admin_port}\n[health]\ninterval_s = 0.5\n[[backends]]\nid = "gpu0"\n'
        f'url = "{sim.url}"\n',
    )
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        assert poll(lambda: _ready(url), 15, 0.05)
        with httpx.Client(timeout=10) as c:
            gen = {"model": "llama3.2", "prompt": "x", "stream": False}
            assert c.post(f"{url}/api/generate", json=gen).status_code == 200
            assert c.get(f"{url}/healthz").status_code == 200
            for path in ("/api/v1/loadbalancer/loads", "/metrics", "/ui"):
                assert c.get(f"{url}{path}").status_code == 404, path
                assert c.get(f"{admin}{path}").status_code == 200, path
            assert c.get(f"{admin}/docs").status_code == 404
            assert "gpu0" in c.get(f"{admin}/api/v1/loadbalancer/loads").json()["loads"]
            assert 'corral_requests_total{backend="gpu0"' in c.get(f"{admin}/metrics").text
            assert c.post(f"{admin}/api/generate", json=gen).status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{admin}/healthz")
