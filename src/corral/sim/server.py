"""Serve the simulator under uvicorn, tuned for throughput."""

from __future__ import annotations

import uvicorn

from corral.sim.app import create_sim_app
from corral.sim.config import SimConfig


def serve(
    config: SimConfig, host: str = "127.0.0.1", port: int = 11435, log_level: str = "warning"
) -> None:
    """Run a simulated Ollama server until interrupted (uvloop, httptools, no access log)."""
    uvicorn.run(
        create_sim_app(config),
        host=host,
        port=port,
        log_level=log_level,
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,  # Ollama sends no Server header
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
