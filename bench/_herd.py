"""ollama-herd as bench/fleet.py runs it: its own virtual environment, and a launcher for its
router (``herd``) and node agents (``herd-node``) that keeps them on loopback.

The benchmark imports this module for ``ensure_venv``, ``router_argv``, ``node_argv`` and
``herd_env``; the herd venv's Python runs it as a script (``_herd.py router|node ...``), so
at import it needs nothing beyond the standard library.

What the launcher changes, and why (herd 0.11 has no setting for any of these):

- ``get_local_ip`` answers 127.0.0.1. Otherwise a node reports its Ollama at the machine's
  LAN address, and starts a TCP proxy listening on that address when Ollama only listens on
  127.0.0.1; the router would reach the simulators through it, off loopback.
- The router's mDNS advertisement is skipped (it multicasts on every interface and cannot be
  turned off); nodes are given ``--router-url``, so they never browse for it.
- A node reports its simulated GPU's memory (total: the GPU's; used: what the simulator's
  ``/api/ps`` holds in VRAM) and memory bandwidth, instead of this machine's RAM (psutil)
  and an unknown bandwidth. herd was built for unified memory, where RAM is what holds the
  models; without this, four nodes on one machine look identical to its scorer. ``--host-memory``
  on the launcher (``--herd-host-memory`` on the benchmark) turns this off.

Telemetry is off through herd's own settings (``FLEET_NODE_TELEMETRY=false``, which both the
router and the nodes read), its data directory and env file point into the run's temporary
directory, and ``OLLAMA_NUM_PARALLEL`` / ``OLLAMA_MAX_LOADED_MODELS`` tell the nodes what the
simulators do (the nodes read them from their environment, as they would beside a real Ollama).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

PACKAGE = "ollama-herd"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path) -> str | None:
    """herd's version in ``venv``, or None when it is not installed there."""
    py = venv_python(venv)
    if not py.exists():
        return None
    try:
        done = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('ollama-herd'))"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode().strip() or None if done.returncode == 0 else None


def ensure_venv(venv: Path, allow_install: bool, say: Callable[[str], None] = print) -> str | None:
    """herd in its own venv (created, and herd installed with pip, when missing and
    ``allow_install``); its version, or None when it cannot be had."""
    version = installed_version(venv)
    if version or not allow_install:
        return version
    try:
        if not venv_python(venv).exists():
            say(f"creating {venv} ...")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        say(f"pip install {PACKAGE} into {venv} ...")
        subprocess.run(
            [str(venv_python(venv)), "-m", "pip", "install", "--quiet", PACKAGE],
            check=True,
            timeout=600,
            capture_output=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        say(f"{PACKAGE}: could not be installed ({type(exc).__name__}); skipping herd")
        return None
    return installed_version(venv)


def herd_env(base: dict[str, str], data_dir: Path, slots: int, max_loaded: int) -> dict[str, str]:
    """The environment of herd's processes: no telemetry, state under ``data_dir``."""
    env = {k: v for k, v in base.items() if not k.startswith(("FLEET_", "OLLAMA_"))}
    env.update(
        HOME=str(data_dir),
        FLEET_ENV_FILE=str(data_dir / "env"),  # absent: nothing loaded from a home directory
        FLEET_DATA_DIR=str(data_dir),
        FLEET_NODE_DATA_DIR=str(data_dir),
        FLEET_NODE_TELEMETRY="false",
        FLEET_NODE_TELEMETRY_LOCAL_SUMMARY="false",
        OLLAMA_NUM_PARALLEL=str(slots),
        OLLAMA_MAX_LOADED_MODELS=str(max_loaded),
        NO_COLOR="1",
    )
    return env


def router_argv(venv: Path, port: int) -> list[str]:
    launcher = [str(venv_python(venv)), __file__, "router", "--"]
    return [*launcher, "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]


def node_argv(
    venv: Path,
    *,
    node_id: str,
    sim_url: str,
    router_url: str,
    vram_gib: float,
    bandwidth_gbps: float,
    host_memory: bool,
) -> list[str]:
    launcher = [str(venv_python(venv)), __file__, "node", "--sim-url", sim_url]
    launcher += ["--vram-gib", f"{vram_gib:g}", "--bandwidth-gbps", f"{bandwidth_gbps:g}"]
    if host_memory:
        launcher.append("--host-memory")
    return [
        *launcher,
        "--",
        *["--node-id", node_id, "--ollama-host", sim_url, "--router-url", router_url],
        *["--log-level", "WARNING"],
    ]


# --- the launcher (runs in herd's venv) -------------------------------------------------------


def _loopback() -> str:
    return "127.0.0.1"


def _patch_common() -> None:
    import fleet_manager.common.system_metrics as system_metrics

    system_metrics.get_local_ip = _loopback


def _run_router(argv: list[str]) -> None:
    _patch_common()
    import fleet_manager.server.app as app

    class NoAdvertiser:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            pass

    app.FleetServiceAdvertiser = NoAdvertiser  # type: ignore[misc,assignment]
    from fleet_manager.cli.server_cli import app as cli

    cli(argv, prog_name="herd")


def _vram_used_gb(sim_url: str) -> float:
    try:
        with urllib.request.urlopen(sim_url + "/api/ps", timeout=2) as resp:
            models = json.load(resp).get("models") or []
    except (OSError, ValueError):
        return 0.0
    return sum(float(m.get("size_vram", 0)) for m in models) / 1024**3


def _run_node(argv: list[str], opts: argparse.Namespace) -> None:
    _patch_common()
    import fleet_manager.node.agent as agent
    import fleet_manager.node.collector as collector

    agent.get_local_ip = _loopback  # type: ignore[attr-defined]
    collector.get_local_ip = _loopback  # type: ignore[attr-defined]
    if not opts.host_memory:
        from fleet_manager.models.node import MemoryMetrics

        total = opts.vram_gib

        def gpu_memory() -> MemoryMetrics:
            used = min(total, _vram_used_gb(opts.sim_url))
            return MemoryMetrics(
                total_gb=round(total, 2),
                used_gb=round(used, 2),
                available_gb=round(total - used, 2),
            )

        collector.get_memory_metrics = gpu_memory  # type: ignore[attr-defined]
        collector._detect_memory_bandwidth_gbps = lambda: float(opts.bandwidth_gbps)
    from fleet_manager.cli.node_cli import app as cli

    cli(argv, prog_name="herd-node")


def main() -> None:
    p = argparse.ArgumentParser(description="run herd's router or a node agent on loopback")
    p.add_argument("role", choices=["router", "node"])
    p.add_argument("--sim-url", default="")
    p.add_argument("--vram-gib", type=float, default=0.0)
    p.add_argument("--bandwidth-gbps", type=float, default=0.0)
    p.add_argument("--host-memory", action="store_true", help="report this machine's RAM")
    args, rest = p.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest
    os.environ.setdefault("NO_COLOR", "1")
    if args.role == "router":
        _run_router(rest)
    else:
        _run_node(rest, args)


if __name__ == "__main__":
    main()
