"""Timing, queueing, disconnects, keep-alive and faults on a live simulator (real sockets)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from corral.sim.harness import SimProcess, SimThread
from tests.helpers import until

pytestmark = pytest.mark.integration

GEN = {"model": "llama3.2", "prompt": "hello"}


@pytest.fixture
def sim() -> Iterator[SimThread]:
    with SimThread() as server:
        yield server


@pytest.fixture
async def client(sim: SimThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
        yield c


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await client.get("/_sim/stats")).json()  # type: ignore[no-any-return]


async def test_ttft_and_token_interval(sim: SimThread, client: httpx.AsyncClient) -> None:
    """The first token comes after ttft_s, then one token per token_interval_s."""
    sim.config.ttft_s, sim.config.token_interval_s, sim.config.tokens = 0.1, 0.04, 5
    start = time.perf_counter()
    arrivals = []
    async with client.stream("POST", "/api/generate", json=GEN) as r:
        async for _ in r.aiter_lines():
            arrivals.append(time.perf_counter() - start)
    assert len(arrivals) == 6
    assert 0.1 <= arrivals[0] < 0.5
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:5])]
    assert all(0.025 < g < 0.2 for g in gaps), gaps
    assert arrivals[4] - arrivals[0] == pytest.approx(0.16, abs=0.08)


async def test_cancel_mid_stream_is_recorded_and_frees_the_slot(
    sim: SimThread, client: httpx.AsyncClient
) -> None:
    """Closing a stream mid-way is noticed within 1 s, recorded, and frees the slot."""
    sim.config.token_interval_s, sim.config.tokens, sim.config.num_parallel = 0.05, 1000, 1
    async with client.stream(
        "POST", "/api/chat", json={**GEN, "messages": [{"content": "x"}]}
    ) as r:
        lines = r.aiter_lines()
        await lines.__anext__()
        await lines.__anext__()
    closed = time.monotonic()
    st = await until(lambda: _cancelled(client), timeout_s=1.0)
    assert time.monotonic() - closed < 1.0
    rec = st["recent"][-1]
    assert (rec["route"], rec["status"], rec["cancelled"]) == ("/api/chat", 200, True)
    assert st["in_flight"] == 0
    sim.config.tokens = 1
    r2 = await client.post("/api/generate", json={**GEN, "stream": False}, timeout=2)
    assert r2.json()["done"] is True  # the single slot was given back


async def _cancelled(client: httpx.AsyncClient) -> dict[str, Any] | None:
    st = await stats(client)
    return st if st["cancelled"] else None


async def test_cancel_while_queued_records_499(sim: SimThread, client: httpx.AsyncClient) -> None:
    """A client that gives up while waiting for a slot is recorded as 499 cancelled."""
    sim.config.token_interval_s, sim.config.tokens, sim.config.num_parallel = 0.05, 100, 1
    async with client.stream("POST", "/api/generate", json=GEN) as holder:
        held = holder.aiter_lines()  # keep a reference: a collected iterator closes the stream
        await held.__anext__()
        waiter = asyncio.create_task(client.post("/api/generate", json=GEN))
        await until(lambda: _in_flight(client, 2))
        waiter.cancel()
        st = await until(lambda: _cancelled(client))
    rec = next(r for r in st["recent"] if r["cancelled"])
    assert (rec["status"], rec["error"]) == (499, "request canceled")
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def _in_flight(client: httpx.AsyncClient, n: int) -> bool:
    return (await stats(client))["in_flight"] >= n


async def test_num_parallel_queues_extra_requests(sim: SimThread) -> None:
    """With 2 slots, 4 requests of 0.3 s each finish in two waves (~0.6 s, not 0.3 s nor
    1.2 s), none rejected."""
    sim.config.ttft_s, sim.config.tokens, sim.config.num_parallel = 0.3, 1, 2
    body = {**GEN, "stream": False}
    async with httpx.AsyncClient(base_url=sim.url, timeout=5) as c:
        start = time.perf_counter()
        results = await asyncio.gather(*(c.post("/api/generate", json=body) for _ in range(4)))
        elapsed = time.perf_counter() - start
    assert [r.status_code for r in results] == [200] * 4
    assert 0.58 < elapsed < 1.1


async def test_cold_load_and_keep_alive_expiry(sim: SimThread, client: httpx.AsyncClient) -> None:
    """A cold load takes load_s (reported as load_duration); keep_alive expiry unloads."""
    sim.config.load_s = 0.15
    body = {**GEN, "stream": False, "keep_alive": 0.3}
    first = (await client.post("/api/generate", json=body)).json()
    assert first["load_duration"] >= 0.15e9
    second = (await client.post("/api/generate", json=body)).json()
    assert second["load_duration"] < 0.1e9
    assert len((await client.get("/api/ps")).json()["models"]) == 1

    async def unloaded() -> bool:
        return (await client.get("/api/ps")).json()["models"] == []

    await until(unloaded, timeout_s=2)


async def test_fault_drop_closes_connection(sim: SimThread, client: httpx.AsyncClient) -> None:
    """drop_after_tokens aborts the TCP connection after N lines, with no final line."""
    sim.config.faults.drop_after_tokens = 2
    got: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        await _collect(client, got)
    assert len(got) == 2
    rec = (await stats(client))["recent"][-1]
    assert rec["error"] == "connection dropped"


async def _collect(client: httpx.AsyncClient, into: list[str]) -> None:
    async with client.stream("POST", "/api/generate", json=GEN) as r:
        async for line in r.aiter_lines():
            into.append(line)


async def test_fault_hang_until_client_leaves(sim: SimThread, client: httpx.AsyncClient) -> None:
    """hang never answers; the client's timeout ends it and the simulator records a cancel."""
    sim.config.faults.hang = True
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/api/chat", json={**GEN, "messages": [{"content": "x"}]}, timeout=0.3)
    st = await until(lambda: _cancelled(client))
    assert st["recent"][-1]["status"] == 499
    assert st["in_flight"] == 0


async def test_fault_slow_delays_first_byte(sim: SimThread, client: httpx.AsyncClient) -> None:
    """slow_s delays the first byte of an inference answer."""
    sim.config.faults.slow_s = 0.2
    start = time.perf_counter()
    r = await client.post("/v1/completions", json={"model": "llama3.2", "prompt": "x"})
    assert r.status_code == 200
    assert time.perf_counter() - start >= 0.2


def test_sim_process_flags_faults_kill_restart() -> None:
    """The subprocess takes CLI flags, answers control calls, dies on kill, and restarts on
    the same port."""
    with SimProcess(name="gpu9", tokens=2, busy=True, models="llama3.2,big:30") as proc:
        r = httpx.post(proc.url + "/api/generate", json={**GEN, "stream": False})
        assert r.status_code == 503
        assert proc.set_faults(busy=False)["busy"] is False
        r = httpx.post(proc.url + "/api/generate", json={**GEN, "stream": False})
        assert r.json()["eval_count"] == 2
        tags = httpx.get(proc.url + "/api/tags").json()["models"]
        assert [m["name"] for m in tags] == ["llama3.2:latest", "big:latest"]
        assert proc.stats()["name"] == "gpu9"
        proc.kill()
        with pytest.raises(httpx.ConnectError):
            httpx.get(proc.url + "/")
        proc.restart()
        assert httpx.get(proc.url + "/").text == "Ollama is running"
        assert "/api/generate" not in proc.stats()["by_route"]  # a fresh process
