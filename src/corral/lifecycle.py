"""Owns corral's background tasks: starts them by name, stops them in reverse order."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("corral.lifecycle")


class Lifecycle:
    """Named background tasks, cancelled newest first under a time bound."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._report)
        self._tasks.append(task)
        return task

    @staticmethod
    def _report(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task died", task=task.get_name(), error=repr(task.exception()))

    async def stop(self, timeout_s: float = 5.0) -> None:
        for task in reversed(self._tasks):
            task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            except (asyncio.CancelledError, TimeoutError):
                pass
            except Exception as exc:
                log.error("background task failed on stop", task=task.get_name(), error=repr(exc))
        self._tasks.clear()
