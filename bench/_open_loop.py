"""Open-loop sending: each request starts at its own time, whatever the earlier ones do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def send_at(
    timed: Iterable[tuple[float, T]],
    send: Callable[[T], Awaitable[object]],
    t0: float,
    max_outstanding: int,
) -> int:
    """Start ``send(item)`` as its own task at ``t0 + at`` (``time.perf_counter()``) for each
    (at, item); wait for all. An arrival that finds ``max_outstanding`` in flight is skipped:
    returns how many were."""
    tasks: set[asyncio.Task[object]] = set()
    skipped = 0
    perf = time.perf_counter
    for at, item in timed:
        delay = t0 + at - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_outstanding:
            skipped += 1
            continue
        task: asyncio.Task[object] = asyncio.ensure_future(send(item))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(list(tasks))
    return skipped
