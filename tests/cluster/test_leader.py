"""One leader: a Redis lock with a TTL; another replica takes over when the leader dies."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.cluster.conftest import LEASE_S, ClusterFactory
from tests.helpers import until

pytestmark = pytest.mark.cluster


async def test_exactly_one_leader(cluster_factory: ClusterFactory) -> None:
    replicas = [await cluster_factory() for _ in range(3)]
    await until(lambda: sum(r.is_leader for r in replicas) == 1, LEASE_S)
    await asyncio.sleep(LEASE_S)  # renewals keep it where it is
    assert sum(r.is_leader for r in replicas) == 1


async def test_clean_stop_hands_leadership_over_at_once(cluster_factory: ClusterFactory) -> None:
    a = await cluster_factory()
    await until(lambda: a.is_leader, LEASE_S)
    b = await cluster_factory()
    changes: list[bool] = []
    b.on_leadership(changes.append)
    await a.close()  # resigns
    started = time.monotonic()
    await until(lambda: b.is_leader, LEASE_S)
    assert time.monotonic() - started < LEASE_S / 3 + 0.2
    assert changes == [True]


async def test_leader_moves_when_the_leader_is_killed(
    cluster_factory: ClusterFactory, replica_process: Any
) -> None:
    """SIGKILL the leader: another replica leads within lease_s."""
    leader = await replica_process("leader")
    await leader.ready()
    b = await cluster_factory()
    await asyncio.sleep(LEASE_S / 2)
    assert not b.is_leader
    await leader.kill()
    killed = time.monotonic()
    await until(lambda: b.is_leader, LEASE_S + 0.5)
    assert time.monotonic() - killed <= LEASE_S + 0.1
