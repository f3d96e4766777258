"""The simulator's per-slot prompt cache, prefill time, scheduler counters and their settings."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from corral.sim import SimConfig, create_sim_app
from corral.sim.app import SimApp
from corral.sim.cache import PromptCache, common_prefix
from corral.sim.text import chat_tokens, output_tokens, text_of
from tests.helpers import sim_cli

QUESTION = " ".join(f"w{i}" for i in range(100))


@pytest.fixture
def app() -> SimApp:
    return create_sim_app(SimConfig(tokens=3, prefill_tps=1000))


async def chat(client: httpx.AsyncClient, messages: list[Any], **extra: Any) -> dict[str, Any]:
    body = {"model": "llama3.2", "messages": messages, "stream": False, **extra}
    r = await client.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def scheduler_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    return dict((await client.get("/_sim/stats")).json()["scheduler"])


def test_slot_choice_is_longest_prefix_among_idle_slots() -> None:
    """A prompt takes the idle slot sharing the longest prefix (first on ties), never a busy
    one, and always leaves at least one token to process."""
    cache = PromptCache()
    s0, cached = cache.take(("a", "b"), 2)
    s1, cached = cache.take(("x",), 2)  # s0 busy
    assert cache.slots == [s0, s1]
    s0.tokens, s0.in_use = ("a", "b", "c"), False
    s1.tokens, s1.in_use = ("x",), False
    assert cache.take(("y",), 2) == (s0, 0)  # nothing shared anywhere: the first idle slot
    s0.tokens, s0.in_use = ("a", "b", "c"), False
    slot, cached = cache.take(("a", "b", "c", "d"), 2)
    assert (slot, cached) == (s0, 3)
    other, cached = cache.take(("a", "b", "c", "d"), 2)  # s0 busy: s1 shares nothing
    assert (other, cached) == (s1, 0)
    s0.tokens, s0.in_use = ("a", "b"), False
    assert cache.take(("a", "b"), 2) == (s0, 1)
    assert common_prefix(("a", "b"), ("a", "c")) == 1


async def test_follow_up_turn_hits_the_cache(client: httpx.AsyncClient) -> None:
    """A follow-up that resends the history and the answer reuses the slot: only the new tokens
    are prefilled (a shorter prompt_eval_duration), while prompt_eval_count stays the whole
    prompt, as Ollama reports it."""
    turn1 = [{"role": "user", "content": QUESTION}]
    first = await chat(client, turn1)
    answer = first["message"]["content"]
    assert answer == text_of(3)
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "ok"}]
    second = await chat(client, turn2)
    cached = len(chat_tokens(turn1)) + 3
    assert first["prompt_eval_count"] == len(chat_tokens(turn1)) == 107
    assert second["prompt_eval_count"] == len(chat_tokens(turn2)) == cached + 9
    assert first["prompt_eval_duration"] >= 0.107e9
    assert second["prompt_eval_duration"] < 0.05e9
    stats = await scheduler_stats(client)
    assert stats["prompt_tokens"] == first["prompt_eval_count"] + second["prompt_eval_count"]
    assert stats["prompt_tokens_cached"] == cached


async def test_length_limited_answer_caches_all_but_its_last_token(
    client: httpx.AsyncClient,
) -> None:
    """Ending on num_predict, the last token was never fed back, so the next turn misses it."""
    turn1 = [{"role": "user", "content": "hi"}]
    answer = (await chat(client, turn1, options={"num_predict": 5}))["message"]["content"]
    turn2 = [*turn1, {"role": "assistant", "content": answer}]
    await chat(client, turn2)
    stats = await scheduler_stats(client)
    assert stats["prompt_tokens_cached"] == len(chat_tokens(turn1)) + 4
    assert output_tokens(5) == tuple(answer.split())


async def test_openai_usage_reports_the_whole_prompt(client: httpx.AsyncClient) -> None:
    """/v1 usage.prompt_tokens is the full prompt on a cache hit too."""
    msgs = [{"role": "user", "content": QUESTION}]
    body = {"model": "llama3.2", "messages": msgs}
    first = (await client.post("/v1/chat/completions", json=body)).json()
    second = (await client.post("/v1/chat/completions", json=body)).json()
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"] == 107
    assert (await scheduler_stats(client))["prompt_tokens_cached"] == 106


async def test_reload_starts_with_an_empty_cache(client: httpx.AsyncClient) -> None:
    """A reload starts with an empty cache."""
    msgs = [{"role": "user", "content": QUESTION}]
    await chat(client, msgs)
    await chat(client, msgs, options={"num_ctx": 2048})
    assert (await scheduler_stats(client))["prompt_tokens_cached"] == 0


async def test_scheduler_counters_and_reset(app: SimApp, client: httpx.AsyncClient) -> None:
    """/_sim/stats counts loads, reloads, evictions, busy and load seconds; reset zeroes them."""
    app.config.max_loaded_models = 1
    app.config.load_s = 0.01
    await chat(client, [{"role": "user", "content": "x"}])
    await chat(client, [{"role": "user", "content": "x"}], options={"num_ctx": 2048})
    r = await client.post("/api/generate", json={"model": "qwen2.5:7b", "prompt": "y"})
    assert json.loads(r.text.splitlines()[-1])["done"] is True
    stats = await scheduler_stats(client)
    assert list(stats) == [
        "loads", "reloads", "evictions", "prompt_tokens", "prompt_tokens_cached", "busy_s",
        "load_s",
    ]  # fmt: skip
    assert (stats["loads"], stats["reloads"], stats["evictions"]) == (3, 1, 1)
    assert stats["load_s"] >= 0.03
    assert stats["busy_s"] > 0
    assert [m["name"] for m in (await client.get("/api/ps")).json()["models"]] == ["qwen2.5:7b"]
    await client.post("/_sim/reset")
    stats = await scheduler_stats(client)
    assert (stats["loads"], stats["prompt_tokens"], stats["busy_s"], stats["load_s"]) == (
        0, 0, 0, 0
    )  # fmt: skip


async def test_settings_over_http(client: httpx.AsyncClient) -> None:
    """PUT /_sim/config takes max_loaded_models, load_gbps and prefill_tps."""
    changes = {"max_loaded_models": 2, "load_gbps": 3.5, "prefill_tps": 0}
    config = (await client.put("/_sim/config", json=changes)).json()
    assert {k: config[k] for k in changes} == changes
    assert (await client.put("/_sim/config", json={"load_gbps": -1})).status_code == 400


def test_cli_scheduler_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``corral sim --max-loaded-models/--load-gbps/--prefill-tps`` land in the SimConfig."""
    invoke, seen = sim_cli(monkeypatch)
    args = ["--max-loaded-models", "5", "--load-gbps", "2", "--prefill-tps", "900"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert (seen[0].max_loaded_models, seen[0].load_gbps, seen[0].prefill_tps) == (5, 2, 900)
    assert invoke([]).exit_code == 0
    assert (seen[1].max_loaded_models, seen[1].load_gbps, seen[1].prefill_tps) == (3, 0, 0)


async def test_shared_compute_slows_two_models_generating_at_once() -> None:
    """With shared_compute, two models streaming at once on one GPU each take about twice as
    long as one alone; without it, they do not slow each other."""
    for shared, lo, hi in ((True, 1.6, 2.6), (False, 0.7, 1.3)):
        app = create_sim_app(SimConfig(tokens=20, token_interval_s=0.01, shared_compute=shared))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:

            async def one(model: str, client: httpx.AsyncClient = c) -> float:
                t = time.perf_counter()
                body = {"model": model, "prompt": "hi", "stream": False}
                r = await client.post("/api/generate", json=body)
                assert r.status_code == 200
                return time.perf_counter() - t

            alone = await one("llama3.2")
            together = await asyncio.gather(one("llama3.2"), one("qwen2.5:7b"))
            assert lo < max(together) / alone < hi, (shared, alone, together)
