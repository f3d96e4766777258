"""Shared limits: one token bucket per client key for the whole fleet."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import ClusterFactory

pytestmark = pytest.mark.cluster


async def test_rate_limit_is_shared_across_replicas(cluster_factory: ClusterFactory) -> None:
    """A key allowed a burst of 3 gets 3 requests in all, whichever replicas they reach."""
    a, b = await cluster_factory(), await cluster_factory()
    answers = [await (a if i % 2 else b).take("team-a", 0.5, 3) for i in range(6)]
    assert answers == [True, True, True, False, False, False]
    wait = await a.wait_s("team-a", 0.5, 3)
    assert wait is not None
    assert 0 < wait <= 2.0
    assert await b.take("team-b", 0.5, 3) is True  # another key, another bucket


async def test_bucket_refills_at_the_rate(cluster_factory: ClusterFactory) -> None:
    a = await cluster_factory()
    assert await a.take("fast", 20, 1) is True
    assert await a.take("fast", 20, 1) is False
    wait = await a.wait_s("fast", 20, 1)
    assert wait is not None
    assert wait <= 0.05
