"""The simulator in-process: each module's ``app`` fixture (its own SimConfig) behind one
httpx client over ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from corral.sim.app import SimApp


@pytest.fixture
async def client(app: SimApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c
