"""The simulator's state (``Sim``) and one inference on it (``Job``): faults before the first
byte, a runner reference and a parallel slot, time to first token, paced tokens, the faults
that cut a stream short, and Ollama's final-chunk metrics."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from corral.sim.cache import CacheSlot, Tokens
from corral.sim.config import SimConfig, SimModel, registry_models
from corral.sim.names import name_key
from corral.sim.scheduler import BUSY, Runner, Scheduler
from corral.sim.stats import Stats
from corral.sim.store import Store
from corral.sim.text import output_tokens
from corral.sim.wire import Exchange, HTTPError

MODEL_ERROR = "an error was encountered while running the model"
RUNNER_CRASH = "llama runner process has terminated: exit status 2"
DROP = "drop"
ERROR = "error"


class Sim:
    """Everything one simulated server holds, all reading the same live ``SimConfig``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.store = Store(config)
        self.scheduler = Scheduler(config)
        self.stats = Stats(config.name)
        # What /api/pull can fetch, by lower-case canonical name; tests may add entries.
        self.registry: dict[str, SimModel] = {
            key: m for m in registry_models().values() if (key := name_key(m.name))
        }

    def find(self, raw: str) -> tuple[str, SimModel] | None:
        """A local model by the name a client sent."""
        return self.store.find(raw) if raw else None


class Job:
    """One inference: ``async with Job(...) as job`` holds a runner reference (and a parallel
    slot unless ``slot=False``) and gives them back on every exit path, cancellation included."""

    __slots__ = (
        "_cache_slot",
        "_length_limited",
        "_prompt",
        "_slot",
        "cached",
        "eval_count",
        "eval_ns",
        "ex",
        "keep_alive",
        "key",
        "load_ns",
        "model",
        "options",
        "prompt_ns",
        "runner",
        "sim",
    )

    def __init__(
        self,
        sim: Sim,
        ex: Exchange,
        key: str,
        model: SimModel,
        keep_alive: float | None,
        options: dict[str, Any],
        slot: bool = True,
    ) -> None:
        self.sim = sim
        self.ex = ex
        self.key = key
        self.model = model
        self.keep_alive = keep_alive
        self.options = options
        self._slot = slot
        self._cache_slot: CacheSlot | None = None
        self._prompt: Tokens = ()
        n = options.get("num_predict")
        # Ending on num_predict, the last token is sampled but never fed back into the cache.
        self._length_limited = isinstance(n, int | float) and not isinstance(n, bool) and n >= 0
        self.runner: Runner | None = None
        self.load_ns = 0
        self.cached = 0
        self.prompt_ns = 0
        self.eval_ns = 0
        self.eval_count = 0

    async def __aenter__(self) -> Job:
        faults = self.sim.config.faults
        if faults.busy:
            raise HTTPError(503, BUSY)
        if faults.error_rate > 0 and random.random() < faults.error_rate:
            raise HTTPError(500, RUNNER_CRASH)
        if faults.hang:
            # Never answers; the disconnect watcher cancels us when the client gives up.
            await asyncio.get_running_loop().create_future()
        t = time.perf_counter_ns()
        sched = self.sim.scheduler
        runner = await sched.acquire(self.key, self.model, self.keep_alive, self.options)
        if self._slot:
            try:
                await runner.slots.acquire()
            except BaseException:
                sched.release(runner)
                raise
            sched.counters.slot_taken()
        self.runner = runner
        self.load_ns = time.perf_counter_ns() - t
        if faults.slow_s > 0:
            # After taking the slot: a slow backend is slow while holding its capacity.
            await asyncio.sleep(faults.slow_s)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner, self.runner = self.runner, None
        if runner is None:
            return
        cache_slot, self._cache_slot = self._cache_slot, None
        if cache_slot is not None:
            if self.prompt_ns:  # prefill done: the prompt and the tokens fed back since
                fed = self.eval_count - (1 if self._length_limited and self.eval_count else 0)
                cache_slot.tokens = self._prompt + output_tokens(fed)
            cache_slot.in_use = False
        if self._slot:
            runner.slots.release()
            self.sim.scheduler.counters.slot_freed()
        self.sim.scheduler.release(runner)

    async def prompt(self, tokens: Tokens | None = None, count: int = 0) -> int:
        """Prompt processing: ``ttft_s`` plus the uncached prompt tokens at ``prefill_tps``.

        ``tokens`` (generate and chat) go through the runner's prompt cache; ``count`` tokens
        (embeddings) are all processed. Returns the prompt's token count, which is what Ollama
        reports as ``prompt_eval_count`` whether or not part of it came from the cache: both
        the Go runners (``numPromptInputs`` is the whole prompt, taken before the cache is
        consulted) and llama-server since 0.30 (``cache_n + prompt_n``) count it whole.
        """
        t = time.perf_counter_ns()
        config = self.sim.config
        cached = 0
        if tokens is not None:
            count = len(tokens)
            if self.runner is not None:
                capacity = max(1, config.num_parallel)
                self._cache_slot, cached = self.runner.cache.take(tokens, capacity)
        counters = self.sim.scheduler.counters
        counters.prompt_tokens += count
        counters.prompt_tokens_cached += cached
        self.cached = cached
        delay = config.ttft_s
        if config.prefill_tps > 0:
            delay += (count - cached) / config.prefill_tps
        delay *= self.share()
        if delay > 0:
            await asyncio.sleep(delay)
        self._prompt = tokens or ()
        self.prompt_ns = max(1, time.perf_counter_ns() - t)
        return count

    def share(self) -> int:
        """How many runners share the GPU now: with ``shared_compute`` each of them computes
        at that fraction of its speed (models on one GPU take turns; one model's parallel
        requests batch together), else 1."""
        if not self.sim.config.shared_compute:
            return 1
        return max(1, self.sim.scheduler.busy_runners())

    def fault_at(self, i: int) -> str | None:
        """The stream fault due once ``i`` tokens were sent (faults are read live)."""
        faults = self.sim.config.faults
        if faults.drop_after_tokens is not None and i >= faults.drop_after_tokens:
            return DROP
        if faults.mid_stream_error_after is not None and i >= faults.mid_stream_error_after:
            return ERROR
        return None

    async def tokens(self, n: int, on_token: Callable[[int], Awaitable[None]] | None) -> str | None:
        """Produce ``n`` tokens, token i at ``i * token_interval_s`` after the first; returns
        the fault that stopped it early (or that is due at the end), else None."""
        interval = self.sim.config.token_interval_s
        start = time.perf_counter()
        due = start
        sleep = asyncio.sleep
        for i in range(n):
            fault = self.fault_at(i)
            if fault is not None:
                self.eval_count = i
                return fault
            if i:
                if interval > 0:
                    # Absolute deadlines keep the rate exact over long streams.
                    due += interval * self.share()
                    await sleep(max(0.0, due - time.perf_counter()))
                elif not i & 63:
                    await sleep(0)  # let other requests (and disconnects) in
            if on_token is not None:
                await on_token(i)
        self.eval_count = n
        self.eval_ns = int((time.perf_counter() - start) * 1e9)
        if n and interval > 0:
            self.eval_ns += int(interval * 1e9)  # the last token took an interval too
        return self.fault_at(n)

    def metrics(self, prompt_count: int) -> dict[str, int]:
        """The final-chunk metrics in Go key order, zeros omitted (``omitempty``);
        ``prompt_eval_cached_count``: the prompt tokens read from the cache (Ollama 0.33)."""
        items = (
            ("total_duration", time.perf_counter_ns() - self.ex.t0),
            ("load_duration", self.load_ns),
            ("prompt_eval_count", prompt_count),
            ("prompt_eval_cached_count", self.cached),
            ("prompt_eval_duration", self.prompt_ns),
            ("eval_count", self.eval_count),
            ("eval_duration", self.eval_ns if self.eval_count else 0),
        )
        return {k: v for k, v in items if v}


async def end_by_fault(ex: Exchange, fault: str, stream_error: bytes) -> None:
    """End a response the way ``fault`` says: drop the connection, or report the model error
    (a final error line when the stream started, else a real 500)."""
    if fault == DROP:
        ex.record.error = "connection dropped"
        await ex.abort()
        return
    if not ex.started:
        raise HTTPError(500, MODEL_ERROR)
    ex.record.error = MODEL_ERROR
    await ex.end(stream_error)


def num_predict(options: dict[str, Any], default: int) -> tuple[int, str]:
    """Tokens to generate and the done reason: ``num_predict`` >= 0 wins and ends in
    ``length``; otherwise the configured count ends in ``stop``."""
    n = options.get("num_predict")
    if isinstance(n, int | float) and not isinstance(n, bool) and n >= 0:
        return int(n), "length"
    return default, "stop"
