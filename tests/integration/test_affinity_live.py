"""Model-aware routing over real loopback simulators: loaded models, spills, cold placement,
conversations."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import httpx
import pytest

from corral.sim.config import GIB
from tests.helpers import loads, metric, poll, served_by, warm

pytestmark = pytest.mark.integration


def three(sim_factory: Any, corral_factory: Any, **balancer: Any) -> tuple[list[Any], Any]:
    sims = [sim_factory(name=f"s{i}", tokens=4) for i in range(3)]
    corral = corral_factory(
        [{"id": f"gpu{i}", "url": s.url, "max_concurrent": 4} for i, s in enumerate(sims)],
        balancer={"strategy": "round_robin", **balancer},
    )
    return sims, corral


def test_loaded_model_requests_go_to_its_backend(sim_factory: Any, corral_factory: Any) -> None:
    """qwen2.5:7b loaded on gpu1 only: even round robin sends all its requests there, and no
    other simulator loads it."""
    sims, corral = three(sim_factory, corral_factory)
    with corral.client() as client:
        warm(client, "qwen2.5:7b", sims[1])
        assert served_by(client, {"model": "qwen2.5:7b", "prompt": "hi"}, 9) == Counter(gpu1=9)
        assert metric(client, 'corral_cold_loads_avoided_total{backend="gpu1"}') == 9
        assert metric(client, "corral_cold_loads_total") == 0
        assert (
            metric(client, 'corral_model_resident{backend="gpu1",model="qwen2.5:7b",where="gpu"}')
            == 1
        )
    for i in (0, 2):
        with httpx.Client(base_url=sims[i].url) as direct:
            assert direct.get("/api/ps").json()["models"] == []


def test_a_burst_waits_for_the_holder_instead_of_loading_copies(
    sim_factory: Any, corral_factory: Any
) -> None:
    """Six concurrent streams of a model loaded on gpu0 (4 slots), each about 0.6 s: four
    stream at once, the other two wait in corral's queue for gpu0's next free slot (well under
    a second) rather than each start a cold load on an idle GPU; every stream completes and no
    other simulator loads the model."""
    sims, corral = three(sim_factory, corral_factory)
    for s in sims:
        s.config.tokens = 30
        s.config.token_interval_s = 0.02
        s.config.load_s = 1.0  # a load costs more than waiting for one stream to end
    with corral.client() as client:
        warm(client, "llama3.2", sims[0])
        # corral learns how long a request holds its slot there.
        assert served_by(client, {"model": "llama3.2", "prompt": "x"}, 3) == Counter(gpu0=3)
        backends: list[str] = []

        def stream() -> None:
            with (
                httpx.Client(base_url=corral.url, timeout=30) as c,
                c.stream("POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}) as r,
            ):
                assert r.status_code == 200
                lines = list(r.iter_lines())
                assert '"done":true' in lines[-1]
                backends.append(r.headers["x-corral-backend"])

        workers = [threading.Thread(target=stream) for _ in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
        assert Counter(backends) == Counter(gpu0=6)
        assert metric(client, "corral_cold_loads_total") == 0
    for i in (1, 2):
        with httpx.Client(base_url=sims[i].url) as direct:
            assert direct.get("/api/ps").json()["models"] == []


def test_cold_model_goes_to_the_gpu_with_room(sim_factory: Any, corral_factory: Any) -> None:
    """Both GPUs report memory through their exporter pages; the one with free room gets the
    cold model, not the one already filled by another model."""
    small = sim_factory(name="small", vram_bytes=8 * GIB, tokens=4)
    big = sim_factory(name="big", vram_bytes=16 * GIB, tokens=4)
    corral = corral_factory(
        [
            {"id": "small", "url": small.url, "gpu_metrics_url": f"{small.url}/_sim/dcgm"},
            {"id": "big", "url": big.url, "gpu_metrics_url": f"{big.url}/_sim/dcgm"},
        ],
        gpu={"poll_s": 0.1},
        balancer={"strategy": "round_robin"},
    )
    with corral.client() as client:
        assert poll(lambda: loads(client)["small"]["vram_free_bytes"] is not None, 5)
        # Cold everywhere: the 16 GiB GPU has more room than the 8 GiB one.
        assert served_by(client, {"model": "llama3.2", "prompt": "hi"}, 3) == Counter(big=3)
        with httpx.Client(base_url=big.url, timeout=10) as direct:  # now fill big up
            direct.post("/api/pull", json={"model": "mistral", "stream": False})
            for model in ("qwen2.5:7b", "mistral"):
                direct.post("/api/generate", json={"model": model, "prompt": "", "stream": False})

        def free() -> dict[str, int]:
            return {k: e["vram_free_bytes"] for k, e in loads(client).items()}

        assert poll(lambda: free()["big"] < free()["small"], 5), free()
        for sim in (small, big):  # a model cold everywhere
            with httpx.Client(base_url=sim.url, timeout=10) as direct:
                direct.post("/api/pull", json={"model": "gemma3:1b", "stream": False})
        assert poll(lambda: all("gemma3:1b" in e["models"] for e in loads(client).values()), 10)
        # It goes where there is more room now.
        assert served_by(client, {"model": "gemma3:1b", "prompt": "hi"}, 3) == Counter(small=3)


def test_conversation_stays_on_its_backend_across_turns(
    sim_factory: Any, corral_factory: Any
) -> None:
    """The model is loaded everywhere and the strategy is round robin, yet every turn of one
    chat lands where its first turn did; X-Session-ID does the same for any request."""
    sims, corral = three(sim_factory, corral_factory)
    with corral.client() as client:
        warm(client, "llama3.2", *sims)
        system = {"role": "system", "content": "You are terse."}
        homes = set()
        for chat in range(3):
            history = [system, {"role": "user", "content": f"question {chat}"}]
            first = served_by(client, {"model": "llama3.2", "messages": history})
            home = next(iter(first))
            homes.add(home)
            for turn in range(3):
                history += [
                    {"role": "assistant", "content": f"answer {turn}"},
                    {"role": "user", "content": f"follow-up {turn}"},
                ]
                assert served_by(client, {"model": "llama3.2", "messages": history}) == Counter(
                    {home: 1}
                )
        assert len(homes) > 1  # different chats still spread
        tagged = served_by(
            client, {"model": "llama3.2", "prompt": "a"}, 1, **{"X-Session-ID": "s1"}
        )
        again = served_by(client, {"model": "llama3.2", "prompt": "b"}, 5, **{"X-Session-ID": "s1"})
        assert again == Counter({next(iter(tagged)): 5})


def test_users_opening_with_the_same_words_are_not_one_conversation(
    sim_factory: Any, corral_factory: Any
) -> None:
    """Many users who send the same first message are spread like any requests (nothing is
    cached for them yet); each one's second turn then goes where its first was answered."""
    sims, corral = three(sim_factory, corral_factory)
    with corral.client() as client:
        warm(client, "llama3.2", *sims)
        opening = [{"role": "user", "content": "hello, who are you?"}]
        first = served_by(client, {"model": "llama3.2", "messages": opening}, 6)
        assert len(first) == 3, first  # round robin over all three, not piled on one
        home = next(iter(served_by(client, {"model": "llama3.2", "messages": opening})))
        follow_up = [
            *opening,
            {"role": "assistant", "content": "an assistant"},
            {"role": "user", "content": "and what can you do?"},
        ]
        assert served_by(client, {"model": "llama3.2", "messages": follow_up}, 3) == Counter(
            {home: 3}
        )
