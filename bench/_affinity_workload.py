"""bench/affinity.py's workload and cold-load counting. Pure functions, no I/O.

Every client is a person at a chat window: it thinks (exponential, ``think_mean_s``), then
sends one generate request for a model drawn from a skewed mix, streamed or not, asking for a
random small number of tokens; then thinks again. Client ``i`` of seed ``s`` draws the same
sequence in every configuration, so the configurations differ only in where corral sends it.

Cold loads are counted from the simulators' ``/api/ps``, sampled often: a model that is listed
now and was not at the previous sample started loading in between (a simulator lists a model
from the moment its load begins, and loads take far longer than the sampling interval, so none
is missed); one listed before and gone now was evicted or expired.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# Three real 7-8B models from the simulator's registry: on a 12 GiB GPU any two fit, all three
# do not (4.92 + 4.68 + 4.11 GB > 12 GiB, the largest pair 9.6 GB < 12 GiB).
MODELS = ("llama3.1:8b", "qwen2.5:7b", "mistral:latest")
MIX = (50.0, 30.0, 20.0)


@dataclass(frozen=True)
class Step:
    """One request of a client, sent after ``think_s`` of thinking."""

    think_s: float
    model: str
    stream: bool
    tokens: int

    def body(self) -> dict[str, object]:
        """The ``/api/generate`` request body."""
        return {
            "model": self.model,
            "prompt": "Summarize the last message in one sentence.",
            "stream": self.stream,
            "options": {"num_predict": self.tokens},
        }


def parse_mix(text: str, models: Sequence[str] = MODELS) -> tuple[float, ...]:
    """``"50,30,20"``: one positive weight per model, in ``models``' order."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"mix {text!r}: expected numbers like 50,30,20") from None
    if len(weights) != len(models) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mix {text!r}: need {len(models)} weights, none negative, not all 0")
    return weights


def client_steps(
    seed: int,
    client: int,
    *,
    models: Sequence[str] = MODELS,
    mix: Sequence[float] = MIX,
    think_mean_s: float = 1.0,
    stream_share: float = 0.5,
    tokens: tuple[int, int] = (16, 48),
) -> Iterator[Step]:
    """Client ``client``'s endless, reproducible sequence of requests."""
    if think_mean_s <= 0:
        raise ValueError("think_mean_s must be positive")
    if not 0 < tokens[0] <= tokens[1]:
        raise ValueError("tokens must be a range (lo, hi) with 0 < lo <= hi")
    rng = random.Random(seed * 1_000_003 + client)
    while True:
        yield Step(
            think_s=rng.expovariate(1.0 / think_mean_s),
            model=rng.choices(models, weights=mix)[0],
            stream=rng.random() < stream_share,
            tokens=rng.randint(*tokens),
        )


def load_wait_s(body: bytes) -> float:
    """The ``load_duration`` (seconds) of a generate response: its body, or a stream's last
    line. 0 when absent or unreadable."""
    lines = [line for line in body.splitlines() if line.strip()]
    try:
        final = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return 0.0
    value = final.get("load_duration", 0) if isinstance(final, dict) else 0
    return value / 1e9 if isinstance(value, int | float) else 0.0


def resident_changes(before: frozenset[str], now: frozenset[str]) -> tuple[set[str], set[str]]:
    """(models that started loading, models that left) between two ``/api/ps`` samples."""
    return set(now - before), set(before - now)


@dataclass(frozen=True)
class Change:
    """One model appearing in (``loaded``) or leaving a GPU's ``/api/ps``, seconds from start."""

    at_s: float
    gpu: str
    model: str
    loaded: bool


def count_changes(changes: Sequence[Change]) -> dict[str, int]:
    """Cold loads and unloads in all, and cold loads per GPU (``loads:<gpu>``)."""
    out = {"cold_loads": 0, "unloads": 0}
    for c in changes:
        if c.loaded:
            out["cold_loads"] += 1
            out[f"loads:{c.gpu}"] = out.get(f"loads:{c.gpu}", 0) + 1
        else:
            out["unloads"] += 1
    return out
