"""A cluster replica in its own process, for the tests that SIGKILL one.

``python -m tests.cluster.replica leases BACKEND N`` holds N leases on BACKEND (limit N);
``python -m tests.cluster.replica leader`` waits until it leads. Either prints
``ready REPLICA`` and then keeps heartbeating until killed. The Redis URL comes from
CORRAL_TEST_REDIS_URL (never the command line, which ``ps`` shows).
"""

from __future__ import annotations

import asyncio
import os
import sys

from pydantic import SecretStr

from corral.cluster import Cluster
from corral.config import ClusterSettings


async def main(argv: list[str]) -> None:
    url = os.environ["CORRAL_TEST_REDIS_URL"]
    settings = ClusterSettings.model_construct(redis_url=SecretStr(url), name="fleet", lease_s=1.0)
    cluster = Cluster(settings)
    assert await cluster.connect(), "Redis did not answer"
    leads = asyncio.Event()
    cluster.on_leadership(lambda leader: leads.set() if leader else leads.clear())
    runner = asyncio.create_task(cluster.run())
    if argv[0] == "leases":
        backend, count = argv[1], int(argv[2])
        for _ in range(count):
            assert await cluster.acquire(backend, count) is not None
    elif argv[0] == "leader":
        await leads.wait()
    print("ready", cluster.replica, flush=True)
    await runner


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
