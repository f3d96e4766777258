"""The simulator in-process: each module's ``app`` fixture (its own SimConfig) behind one
httpx client over ASGITransport; and one live simulator per module (``sim``, 5 tokens an
answer) with the official clients pointed at it (``oc``, ``ai``, ``anthropic_client``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anthropic
import httpx
import ollama
import openai
import pytest

from corral.sim.app import SimApp
from corral.sim.harness import SimThread


@pytest.fixture
async def client(app: SimApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    with SimThread(tokens=5) as server:
        yield server


@pytest.fixture
def oc(sim: SimThread) -> Iterator[ollama.Client]:
    with ollama.Client(host=sim.url) as client:
        yield client


@pytest.fixture
def ai(sim: SimThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def anthropic_client(sim: SimThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=sim.url, api_key="unused", max_retries=0) as client:
        yield client
