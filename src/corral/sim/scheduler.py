"""Loaded models ("runners") the way Ollama's scheduler keeps them: one load at a time, a bounded
load queue (503 beyond it), per-model parallel slots with an unbounded wait, keep-alive expiry,
and a VRAM budget with eviction of idle runners and partial offload of an oversized first model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from corral.sim.config import GIB, SimConfig, SimModel
from corral.sim.store import details_of
from corral.sim.wire import FOREVER_S, HTTPError, local_time

BUSY = "server busy, please try again.  maximum pending requests exceeded"


def _int_option(options: dict[str, Any], key: str) -> int | None:
    value = options.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


class Slots:
    """A semaphore whose capacity is read live (``num_parallel`` can change at run time)."""

    __slots__ = ("_capacity", "active", "waiters")

    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Take a slot, waiting in FIFO order for one to free up."""
        if self.active < self._capacity() and not self.waiters:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.cancelled():
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            else:
                self.release()  # granted in the same tick we were cancelled: hand it on
            raise

    def release(self) -> None:
        """Give a slot back."""
        self.active -= 1
        self.wake()

    def wake(self) -> None:
        """Grant slots to waiters while there is capacity (also after a capacity increase)."""
        while self.waiters and self.active < self._capacity():
            fut = self.waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)


class Runner:
    """One loaded (or loading) model."""

    __slots__ = (
        "context_length",
        "expires_at",
        "keep_alive_s",
        "key",
        "model",
        "num_gpu",
        "ready",
        "refs",
        "size",
        "size_vram",
        "slots",
    )

    def __init__(
        self,
        key: str,
        model: SimModel,
        num_ctx: int,
        num_gpu: int,
        keep_alive_s: float,
        slots: Slots,
    ) -> None:
        self.key = key
        self.model = model
        self.context_length = num_ctx
        self.num_gpu = num_gpu
        self.keep_alive_s = keep_alive_s
        self.size = model.footprint_bytes
        self.size_vram = 0
        self.ready = False
        self.refs = 0
        self.expires_at = 0.0
        self.slots = slots

    def expiry(self, now: float) -> float:
        """When it unloads; an estimate (now + keep_alive) while it is busy or loading."""
        if self.refs > 0 or not self.ready:
            return now + min(self.keep_alive_s, FOREVER_S)
        return self.expires_at


class Scheduler:
    """All runners of one simulator, against its live ``SimConfig``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.runners: dict[str, Runner] = {}
        self.pending = 0
        self._load_lock = asyncio.Lock()
        self._idle_waiters: list[asyncio.Future[None]] = []

    def default_num_ctx(self) -> int:
        """Ollama's VRAM-tiered default context length."""
        vram = self.config.vram_bytes
        return 262144 if vram >= 47 * GIB else 32768 if vram >= 23 * GIB else 4096

    def purge_expired(self, now: float | None = None) -> None:
        """Unload idle runners whose keep-alive has run out (checked lazily, per request)."""
        now = time.time() if now is None else now
        for key in [
            k for k, r in self.runners.items() if r.ready and r.refs == 0 and r.expires_at <= now
        ]:
            del self.runners[key]

    def _wants(self, model: SimModel, options: dict[str, Any]) -> tuple[int, int]:
        """The runner options a request asks for: (num_ctx, num_gpu); -1 is automatic."""
        num_ctx = _int_option(options, "num_ctx")
        if num_ctx is None or num_ctx <= 0:
            num_ctx = self.default_num_ctx()
        num_gpu = _int_option(options, "num_gpu")
        if num_gpu is None or num_gpu < 0:
            num_gpu = -1
        return min(num_ctx, model.context_length), num_gpu

    async def acquire(
        self, key: str, model: SimModel, keep_alive: float | None, options: dict[str, Any]
    ) -> Runner:
        """A ready runner for ``model`` with a reference held (release it with ``release``).

        Raises HTTPError 503 when a load is needed and the load queue is full.
        """
        self.purge_expired()
        want = self._wants(model, options)
        runner = self.runners.get(key)
        if runner is not None and runner.ready and (runner.context_length, runner.num_gpu) == want:
            runner.refs += 1
            if keep_alive is not None:
                runner.keep_alive_s = keep_alive
            return runner
        if self.pending >= self.config.max_queue:
            raise HTTPError(503, BUSY)
        self.pending += 1
        try:
            async with self._load_lock:
                return await self._load(key, model, keep_alive, want)
        finally:
            self.pending -= 1

    async def _load(
        self, key: str, model: SimModel, keep_alive: float | None, want: tuple[int, int]
    ) -> Runner:
        runner = self.runners.get(key)
        if runner is not None and runner.ready and (runner.context_length, runner.num_gpu) == want:
            runner.refs += 1  # loaded by the request ahead of us in the queue
            if keep_alive is not None:
                runner.keep_alive_s = keep_alive
            return runner
        if runner is not None:  # different runner options: reload once it is idle
            while runner.refs > 0:
                await self._wait_idle()
            self.runners.pop(key, None)
        num_ctx, num_gpu = want
        ka = self.config.keep_alive_s if keep_alive is None else keep_alive
        runner = Runner(
            key, model, num_ctx, num_gpu, ka, Slots(lambda: max(1, self.config.num_parallel))
        )
        need = 0 if num_gpu == 0 else runner.size
        if 0 < num_gpu < model.block_count:
            need = runner.size * num_gpu // model.block_count
        await self._make_room(need)
        used = sum(r.size_vram for r in self.runners.values())
        runner.size_vram = max(0, min(need, self.config.vram_bytes - used))
        runner.refs = 1
        self.runners[key] = runner  # visible in /api/ps while loading, as in Ollama
        try:
            if self.config.load_s > 0:
                await asyncio.sleep(self.config.load_s)
        except BaseException:
            if self.runners.get(key) is runner:
                del self.runners[key]
            self._notify_idle()
            raise
        runner.ready = True
        return runner

    async def _make_room(self, need: int) -> None:
        """Evict idle runners (shortest keep-alive, then name) until ``need`` bytes fit; wait
        for one to go idle when none is. The only model may load partially instead."""
        while True:
            self.purge_expired()
            used = sum(r.size_vram for r in self.runners.values())
            if used + need <= self.config.vram_bytes or not self.runners:
                return
            idle = [r for r in self.runners.values() if r.refs == 0 and r.ready]
            if idle:
                victim = min(idle, key=lambda r: (r.keep_alive_s, r.model.name))
                del self.runners[victim.key]
                continue
            await self._wait_idle()

    async def _wait_idle(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._idle_waiters:
                self._idle_waiters.remove(fut)

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def release(self, runner: Runner) -> None:
        """Drop a reference; the last one starts the keep-alive timer (0 unloads at once)."""
        runner.refs -= 1
        if runner.refs > 0:
            return
        if runner.keep_alive_s <= 0:
            if self.runners.get(runner.key) is runner:
                del self.runners[runner.key]
        else:
            runner.expires_at = time.time() + min(runner.keep_alive_s, FOREVER_S)
        self._notify_idle()

    def expire(self, key: str) -> None:
        """Unload ``key`` now if idle, else as soon as its last request ends (keep_alive 0)."""
        runner = self.runners.get(key)
        if runner is None:
            return
        runner.keep_alive_s = 0.0
        if runner.refs == 0:
            del self.runners[key]
            self._notify_idle()

    def wake_all(self) -> None:
        """Re-check every slot queue (after ``num_parallel`` grew)."""
        for runner in self.runners.values():
            runner.slots.wake()

    def vram_in_use(self) -> int:
        """Bytes of VRAM the runners hold now (expired ones unloaded first)."""
        self.purge_expired()
        return sum(r.size_vram for r in self.runners.values())

    def busy_slots(self) -> int:
        """Parallel slots taken right now, over all runners."""
        return sum(r.slots.active for r in self.runners.values())

    def ps(self) -> list[dict[str, Any]]:
        """The ``/api/ps`` entries, sorted by ``expires_at`` descending."""
        now = time.time()
        self.purge_expired(now)
        rows = []
        for r in self.runners.values():
            exp = r.expiry(now)
            rows.append(
                (
                    exp,
                    {
                        "name": r.model.name,
                        "model": r.model.name,
                        "size": r.size,
                        "digest": r.model.digest,
                        "details": details_of(r.model, parent=""),
                        "expires_at": local_time(exp),
                        "size_vram": r.size_vram,
                        "context_length": r.context_length,
                    },
                )
            )
        rows.sort(key=lambda row: row[0], reverse=True)
        return [row[1] for row in rows]
