"""A faithful simulated Ollama server for the demo, the tests and the benchmarks.

``create_sim_app(SimConfig(...))`` is a pure-ASGI app serving every Ollama route with Ollama's
shapes, plus ``/_sim/`` control routes; ``corral.sim.server.serve`` runs it under uvicorn and
``corral.sim.harness`` starts it in a thread or a subprocess.
"""

from corral.sim.app import SimApp, create_sim_app
from corral.sim.config import Faults, SimConfig, SimModel, default_models, registry_models

__all__ = [
    "Faults",
    "SimApp",
    "SimConfig",
    "SimModel",
    "create_sim_app",
    "default_models",
    "registry_models",
]
