"""Loaded models ("runners") the way Ollama's scheduler keeps them: one load at a time, a bounded
load queue (503 beyond it) that waits behind each load and eviction, a cap on loaded models,
per-model parallel slots with an unbounded wait and a prompt cache, keep-alive expiry, and a
VRAM budget with eviction and partial offload of an oversized first model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from corral.sim.cache import PromptCache
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
        "cache",
        "context_length",
        "evicted",
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
        self.cache = PromptCache()
        self.evicted = False  # picked to make room for another model: counts as an eviction

    def matches(self, want: tuple[int, int]) -> bool:
        """Whether a request asking for ``(num_ctx, num_gpu)`` can use this runner as it is."""
        return self.ready and (self.context_length, self.num_gpu) == want

    def expiry(self, now: float) -> float:
        """When it unloads; an estimate (now + keep_alive) while it is busy or loading."""
        if self.refs > 0 or not self.ready:
            return now + min(self.keep_alive_s, FOREVER_S)
        return self.expires_at


class Counters:
    """What the scheduler did, for ``GET /_sim/stats``: loads started (a reload counts in both
    ``loads`` and ``reloads``), runners evicted to make room for another model, prompt tokens
    of inference requests and how many of them the prompt cache held, seconds with at least one
    slot taken, and seconds spent loading."""

    __slots__ = (
        "_busy_since",
        "_taken",
        "busy_s",
        "evictions",
        "load_s",
        "loads",
        "prompt_tokens",
        "prompt_tokens_cached",
        "reloads",
    )

    def __init__(self) -> None:
        self._taken = 0
        self._busy_since = 0.0
        self.reset()

    def reset(self) -> None:
        """Zero everything (slots taken now count as busy from now on)."""
        self.loads = 0
        self.reloads = 0
        self.evictions = 0
        self.prompt_tokens = 0
        self.prompt_tokens_cached = 0
        self.busy_s = 0.0
        self.load_s = 0.0
        self._busy_since = time.perf_counter()

    def slot_taken(self) -> None:
        """A request took a parallel slot."""
        if self._taken == 0:
            self._busy_since = time.perf_counter()
        self._taken += 1

    def slot_freed(self) -> None:
        """A request gave its parallel slot back."""
        self._taken -= 1
        if self._taken == 0:
            self.busy_s += time.perf_counter() - self._busy_since

    def to_json(self) -> dict[str, Any]:
        """The ``scheduler`` object of ``GET /_sim/stats``."""
        busy = self.busy_s
        if self._taken:
            busy += time.perf_counter() - self._busy_since
        return {
            "loads": self.loads,
            "reloads": self.reloads,
            "evictions": self.evictions,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_cached": self.prompt_tokens_cached,
            "busy_s": round(busy, 6),
            "load_s": round(self.load_s, 6),
        }


class Scheduler:
    """All runners of one simulator, against its live ``SimConfig``.

    As in Ollama's ``server/sched.go``: a request whose model is loaded with the options it
    asks for goes straight to that runner (``getRunner``: no queue, no wait for a load in
    progress). Any other request joins the one pending queue (bounded by ``max_queue``), which
    is served one request at a time and in order (``processPending``): while the head of the
    queue waits for an eviction or for its load, every request behind it waits too. The head
    reuses its model's runner if an earlier request loaded it, reloads it when its options
    differ, evicts one runner when ``max_loaded_models`` are loaded or the model does not fit
    the free VRAM, and loads otherwise; the first model alone may load partially.

    The runner to evict is the one ``findRunnerToUnload`` picks: runners sorted by keep-alive
    (shortest first, forever last), then name; the first idle one, else the first one, which
    is then marked to unload (keep-alive 0) as soon as its last request ends, while the queue
    waits for the unload.
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.runners: dict[str, Runner] = {}
        self.pending = 0
        self.counters = Counters()
        self._load_lock = asyncio.Lock()
        self._unload_waiters: list[asyncio.Future[None]] = []

    def default_num_ctx(self) -> int:
        """Ollama's VRAM-tiered default context length."""
        vram = self.config.vram_bytes
        return 262144 if vram >= 47 * GIB else 32768 if vram >= 23 * GIB else 4096

    def purge_expired(self, now: float | None = None) -> None:
        """Unload idle runners whose keep-alive has run out (checked lazily, per request)."""
        now = time.time() if now is None else now
        for runner in [
            r for r in self.runners.values() if r.ready and r.refs == 0 and r.expires_at <= now
        ]:
            self._unload(runner)

    def _unload(self, runner: Runner) -> None:
        """Remove ``runner`` and wake the queue head waiting for an unload."""
        if self.runners.get(runner.key) is not runner:
            return
        del self.runners[runner.key]
        if runner.evicted:
            self.counters.evictions += 1
        waiters, self._unload_waiters = self._unload_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _wants(self, model: SimModel, options: dict[str, Any]) -> tuple[int, int]:
        """The runner options a request asks for: (num_ctx, num_gpu); -1 is automatic."""
        num_ctx = _int_option(options, "num_ctx")
        if num_ctx is None or num_ctx <= 0:
            num_ctx = self.default_num_ctx()
        num_gpu = _int_option(options, "num_gpu")
        if num_gpu is None or num_gpu < 0:
            num_gpu = -1
        return min(num_ctx, model.context_length), num_gpu

    @staticmethod
    def _use(runner: Runner, keep_alive: float | None) -> Runner:
        runner.refs += 1
        if keep_alive is not None:
            runner.keep_alive_s = keep_alive
        return runner

    async def acquire(
        self, key: str, model: SimModel, keep_alive: float | None, options: dict[str, Any]
    ) -> Runner:
        """A ready runner for ``model`` with a reference held (release it with ``release``).

        Raises HTTPError 503 when a load is needed and the load queue is full.
        """
        self.purge_expired()
        want = self._wants(model, options)
        runner = self.runners.get(key)
        if runner is not None and runner.matches(want):
            return self._use(runner, keep_alive)
        if self.pending >= self.config.max_queue:
            raise HTTPError(503, BUSY)
        self.pending += 1
        try:
            async with self._load_lock:  # FIFO: the pending queue, served one at a time
                return await self._schedule(key, model, keep_alive, want)
        finally:
            self.pending -= 1

    async def _schedule(
        self, key: str, model: SimModel, keep_alive: float | None, want: tuple[int, int]
    ) -> Runner:
        """Serve the head of the pending queue: evict until the model can load, then load."""
        reload = False
        while True:
            self.purge_expired()
            runner = self.runners.get(key)
            if runner is not None:
                if runner.matches(want):
                    return self._use(runner, keep_alive)  # loaded by a request ahead of us
                reload = True
                await self._unload_when_idle(runner)  # other options: reload it
                continue
            limit = self.config.max_loaded_models
            need = self._need(model, want)
            used = sum(r.size_vram for r in self.runners.values())
            if not self.runners or (
                not 0 < limit <= len(self.runners) and used + need <= self.config.vram_bytes
            ):
                return await self._load(key, model, keep_alive, want, need, reload)
            victim = self.victim()
            victim.evicted = True
            await self._unload_when_idle(victim)

    def victim(self) -> Runner:
        """The runner Ollama's ``findRunnerToUnload`` picks (there is at least one)."""
        ordered = sorted(self.runners.values(), key=lambda r: (r.keep_alive_s, r.model.name))
        return next((r for r in ordered if r.refs == 0), ordered[0])

    async def _unload_when_idle(self, runner: Runner) -> None:
        """Set ``runner`` to unload when idle (at once if it is) and wait for an unload."""
        runner.keep_alive_s = 0.0
        if runner.refs == 0:
            self._unload(runner)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unload_waiters.append(fut)
        try:
            # Idle runners whose keep-alive runs out meanwhile unload too; look again then.
            timeout = min(
                (r.expires_at for r in self.runners.values() if r.ready and r.refs == 0),
                default=None,
            )
            if timeout is not None:
                timeout = max(0.0, timeout - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            if fut in self._unload_waiters:
                self._unload_waiters.remove(fut)

    def _need(self, model: SimModel, want: tuple[int, int]) -> int:
        """VRAM bytes a runner with these options takes when it fits."""
        num_gpu = want[1]
        if num_gpu == 0:
            return 0
        if 0 < num_gpu < model.block_count:
            return model.footprint_bytes * num_gpu // model.block_count
        return model.footprint_bytes

    def load_seconds(self, model: SimModel) -> float:
        """How long loading ``model`` takes: ``load_s`` plus its footprint at ``load_gbps``."""
        seconds = self.config.load_s
        if self.config.load_gbps > 0:
            seconds += model.footprint_bytes / (self.config.load_gbps * 1e9)
        return seconds

    async def _load(
        self,
        key: str,
        model: SimModel,
        keep_alive: float | None,
        want: tuple[int, int],
        need: int,
        reload: bool,
    ) -> Runner:
        num_ctx, num_gpu = want
        ka = self.config.keep_alive_s if keep_alive is None else keep_alive
        runner = Runner(
            key, model, num_ctx, num_gpu, ka, Slots(lambda: max(1, self.config.num_parallel))
        )
        used = sum(r.size_vram for r in self.runners.values())
        runner.size_vram = max(0, min(need, self.config.vram_bytes - used))
        runner.refs = 1
        self.runners[key] = runner  # visible in /api/ps while loading, as in Ollama
        self.counters.loads += 1
        self.counters.reloads += reload
        delay = self.load_seconds(model)
        start = time.perf_counter()
        try:
            if delay > 0:
                await asyncio.sleep(delay)
        except BaseException:
            self._unload(runner)
            raise
        finally:
            self.counters.load_s += time.perf_counter() - start
        runner.ready = True
        return runner

    def release(self, runner: Runner) -> None:
        """Drop a reference; the last one starts the keep-alive timer (0 unloads at once)."""
        runner.refs -= 1
        if runner.refs > 0:
            return
        if runner.keep_alive_s <= 0:
            self._unload(runner)
        else:
            runner.expires_at = time.time() + min(runner.keep_alive_s, FOREVER_S)

    def expire(self, key: str) -> None:
        """Unload ``key`` now if idle, else as soon as its last request ends (keep_alive 0)."""
        runner = self.runners.get(key)
        if runner is None:
            return
        runner.keep_alive_s = 0.0
        if runner.refs == 0:
            self._unload(runner)

    def wake_all(self) -> None:
        """Re-check every slot queue (after ``num_parallel`` grew)."""
        for runner in self.runners.values():
            runner.slots.wake()

    def vram_in_use(self) -> int:
        """Bytes of VRAM the runners hold now (expired ones unloaded first)."""
        self.purge_expired()
        return sum(r.size_vram for r in self.runners.values())

    def busy_runners(self) -> int:
        """Runners with at least one parallel slot taken (they share the GPU's compute)."""
        return sum(1 for r in self.runners.values() if r.slots.active)

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
