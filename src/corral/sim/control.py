"""The simulator's own control and introspection routes under ``/_sim/`` (not Ollama's)."""

from __future__ import annotations

from corral.sim.core import Sim
from corral.sim.gpu import CONTENT_TYPE, render_dcgm
from corral.sim.wire import Exchange, HTTPError, decode_body


async def stats(sim: Sim, ex: Exchange) -> None:
    """GET /_sim/stats: the request counters, and the scheduler's under ``scheduler``."""
    doc = sim.stats.to_json()
    doc["scheduler"] = sim.scheduler.counters.to_json()
    await ex.json(doc)


async def reset(sim: Sim, ex: Exchange) -> None:
    """POST /_sim/reset: clear the counters (the scheduler's too) and recent requests."""
    sim.stats.reset()
    sim.scheduler.counters.reset()
    await ex.json({"status": "reset"})


async def faults(sim: Sim, ex: Exchange) -> None:
    """GET /_sim/faults, or PUT a partial update; answers the faults now in force."""
    if ex.method == "PUT":
        try:
            sim.config.faults.update(decode_body(ex.raw, "Faults"))
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
    await ex.json(sim.config.faults.to_json())


async def config(sim: Sim, ex: Exchange) -> None:
    """GET /_sim/config, or PUT a partial update of the timing and capacity tunables."""
    if ex.method == "PUT":
        try:
            sim.config.update(decode_body(ex.raw, "SimConfig"))
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        sim.scheduler.wake_all()  # num_parallel may have grown
    await ex.json(sim.config.timing_json())


async def unload(sim: Sim, ex: Exchange) -> None:
    """POST /_sim/unload: unload every idle model now (busy ones when their last request ends)."""
    for key in list(sim.scheduler.runners):
        sim.scheduler.expire(key)
    await ex.json({"models": sim.scheduler.ps()})


async def dcgm(sim: Sim, ex: Exchange) -> None:
    """GET /_sim/dcgm: the simulated GPU as an NVIDIA dcgm-exporter ``/metrics`` page."""
    await ex.respond(200, render_dcgm(sim).encode(), CONTENT_TYPE)
