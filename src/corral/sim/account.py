"""The routes that act on the ollama.com account an Ollama is signed in with, and the
experimental web routes Ollama passes to ollama.com. The simulator is offline: it answers as
a server signed in as ``sim`` would (the shapes of Ollama's ``server/routes.go``)."""

from __future__ import annotations

from corral.sim.core import Sim
from corral.sim.wire import Exchange, HTTPError

USER = {"id": "sim-user", "email": "sim@example.invalid", "name": "sim", "plan": "free"}


async def status(sim: Sim, ex: Exchange) -> None:
    """GET /api/status: whether cloud models are turned off here."""
    await ex.json({"cloud": {"disabled": False, "source": "default"}})


async def whoami(sim: Sim, ex: Exchange) -> None:
    """POST /api/me: the signed-in user."""
    await ex.json(USER)


async def signout(sim: Sim, ex: Exchange) -> None:
    """POST /api/signout and DELETE /api/user/keys/{key}: ``null``, as Ollama answers."""
    await ex.json(None)


async def web_search(sim: Sim, ex: Exchange) -> None:
    """POST /api/experimental/web_search (no results: the simulator is offline)."""
    if not ex.raw.strip():
        raise HTTPError(400, "missing request body")
    await ex.json({"results": []})


async def web_fetch(sim: Sim, ex: Exchange) -> None:
    """POST /api/experimental/web_fetch."""
    if not ex.raw.strip():
        raise HTTPError(400, "missing request body")
    await ex.json({"title": "", "content": "", "links": []})


async def recommendations(sim: Sim, ex: Exchange) -> None:
    """GET /api/experimental/model-recommendations."""
    await ex.json({"recommendations": []})
