"""bench/fleet.py's fleet and workload. Pure functions, no I/O: the same seed gives the same
conversations, the same texts and the same start times, whoever serves them.

Times here are *real* seconds, as a production fleet would see them; the benchmark divides
them by ``--time-scale`` when it runs (and the simulators' timings with them).

The fleet: four simulated GPUs, one Ollama each, the same five made-up models installed on all.

The workload: ``conversations`` chats on ``/api/chat`` (streamed), each 1-6 turns. Every turn
resends the whole history: the system prompt (80% open with one of three shared ones), every
user turn and every answer exactly as the client received it. 25% paste a document in their
first turn. A chat's model is drawn by Zipf popularity (weight 1/rank). Between turns the user
thinks (exponential, mean ``THINK_MEAN_S``). Chats start as a Poisson process whose rate
alternates between calm (``CALM_S``) and burst (``BURST_S`` at ``BURST_X`` times the calm rate).

Nominal capacity, in requests per second:

    capacity = sum over GPUs g of  slots / S_g
    S_g      = mean over the workload's requests r of  prompt_tokens(r) / prefill_tps_g
                                                       + num_predict(r) * token_interval_g

that is, every slot busy with the average request, each one prefilled from scratch (no prompt
cache) on a model already loaded (no cold load). The offered load is requests per second over
the arrival window; ``load`` = offered ÷ capacity, which sets the window's length:
``window = requests ÷ (load x capacity)``, with a chat's requests counted at its start.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

from corral.sim.text import chat_prompt_tokens


@dataclass(frozen=True)
class Gpu:
    """One simulated GPU and its Ollama. Speeds are real (unscaled)."""

    name: str
    vram_gib: float
    token_ms: float  # between output tokens
    prefill_tps: float  # prompt tokens per second
    load_gbps: float  # model bytes per second from disk into memory
    bandwidth_gbps: float  # memory bandwidth (the data sheet's), for routers that ask


# Relative speeds follow the cards' memory bandwidth (decode) and compute (prefill): an H100
# decodes a mid-size model about 2.5x as fast as an A10 and prefills about 4x as fast; the
# L40S sits between. Load speeds are what NVMe to GPU gives in practice.
GPUS: tuple[Gpu, ...] = (
    Gpu("h100", 80, 8.0, 8000, 4.0, 3350),
    Gpu("l40s-a", 48, 12.0, 4000, 2.0, 864),
    Gpu("l40s-b", 48, 12.0, 4000, 2.0, 864),
    Gpu("a10", 24, 20.0, 2000, 1.5, 600),
)


@dataclass(frozen=True)
class Model:
    name: str
    size_gb: float


# In order of popularity (Zipf rank 1..5). The 40 GB one does not fit the A10's 24 GiB.
MODELS: tuple[Model, ...] = (
    Model("chat:9b", 9.0),
    Model("mini:5b", 4.9),
    Model("code:14b", 14.0),
    Model("large:40b", 40.0),
    Model("writer:16b", 16.0),
)

SLOTS = 4  # OLLAMA_NUM_PARALLEL per simulator, and corral's max_concurrent per backend
MAX_LOADED_MODELS = 3
SYSTEM_SHARE = 0.8
DOCUMENT_SHARE = 0.25
TURNS = (1, 6)
THINK_MEAN_S = 20.0
THINK_BOUNDS_S = (2.0, 90.0)
ANSWER_TOKENS = (200, 900)  # num_predict per turn, uniform
CALM_S, BURST_S, BURST_X = 20.0, 10.0, 3.0
CONVERSATIONS = (90, 110)
TTFT_TARGET_S = 1.0

_WORDS = (
    "the a of to and in for on with as by at from that this these those it its is are was "
    "be been can will should would may might must not no yes more less most least each every "
    "model server request cluster node memory cache token prompt answer question context "
    "latency throughput queue load balance route session history document section table "
    "figure result method data value error report policy budget review customer order "
    "invoice contract clause term payment delivery schedule meeting agenda summary draft "
    "note change issue plan goal risk owner team project release version feature test "
    "build deploy monitor alert metric trend cost price market sales revenue growth region "
    "please explain describe compare list show why how what when where which who whose "
    "first second third next last new old large small fast slow high low good bad clear"
)
_VOCAB = _WORDS.split()


def words(rng: random.Random, n: int) -> str:
    """``n`` words of filler prose (a period every 8-20 words)."""
    out: list[str] = []
    until_stop = rng.randint(8, 20)
    for i in range(n):
        word = rng.choice(_VOCAB)
        until_stop -= 1
        if until_stop == 0 or i == n - 1:
            word += "."
            until_stop = rng.randint(8, 20)
        out.append(word)
    return " ".join(out)


def _system_prompts() -> tuple[str, ...]:
    rng = random.Random(20240611)  # fixed: the same three prompts for every seed
    heads = (
        "You are a careful support assistant for a software company.",
        "You are a senior engineer who reviews code and explains it plainly.",
        "You are an analyst who summarises business documents for executives.",
    )
    return tuple(f"{head} {words(rng, n)}" for head, n in zip(heads, (240, 330, 420), strict=True))


SYSTEM_PROMPTS = _system_prompts()


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Popularity of ranks 1..n, normalised: 1/rank^s."""
    raw = [1.0 / (rank**s) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass(frozen=True)
class Turn:
    user: str
    think_s: float  # thinking before this turn is sent (0 for the first)
    num_predict: int


@dataclass(frozen=True)
class Conversation:
    index: int
    start_s: float
    model: str
    system: int | None  # index into SYSTEM_PROMPTS
    document: bool
    turns: tuple[Turn, ...]

    def messages(self, turn: int, answers: Sequence[str]) -> list[dict[str, str]]:
        """What turn ``turn`` sends: the system prompt, then every earlier user turn and the
        answer to it as received (``answers``), then this turn's user message."""
        if len(answers) < turn:
            raise ValueError(f"turn {turn} needs {turn} earlier answers, got {len(answers)}")
        out: list[dict[str, str]] = []
        if self.system is not None:
            out.append({"role": "system", "content": SYSTEM_PROMPTS[self.system]})
        for i in range(turn):
            out.append({"role": "user", "content": self.turns[i].user})
            out.append({"role": "assistant", "content": answers[i]})
        out.append({"role": "user", "content": self.turns[turn].user})
        return out

    def body(self, turn: int, answers: Sequence[str]) -> dict[str, object]:
        """The streamed ``/api/chat`` request body of turn ``turn``."""
        return {
            "model": self.model,
            "messages": self.messages(turn, answers),
            "stream": True,
            "options": {"num_predict": self.turns[turn].num_predict},
        }

    def expected_answers(self) -> list[str]:
        """Answers of the right length (the simulator's answer to num_predict n is n words);
        used to size the prompts for the capacity estimate."""
        return [" ".join(["w"] * t.num_predict) for t in self.turns]


def _conversation(rng: random.Random, index: int) -> Conversation:
    model = rng.choices([m.name for m in MODELS], weights=zipf_weights(len(MODELS)))[0]
    system = rng.randrange(len(SYSTEM_PROMPTS)) if rng.random() < SYSTEM_SHARE else None
    document = rng.random() < DOCUMENT_SHARE
    turns: list[Turn] = []
    for i in range(rng.randint(*TURNS)):
        question = words(rng, rng.randint(8, 40))
        if i == 0 and document:
            text = f"Here is a document.\n\n{words(rng, rng.randint(1000, 2000))}\n\n{question}"
        else:
            text = question
        think = 0.0
        if i:
            lo, hi = THINK_BOUNDS_S
            think = min(hi, max(lo, rng.expovariate(1.0 / THINK_MEAN_S)))
        turns.append(Turn(text, think, rng.randint(*ANSWER_TOKENS)))
    return Conversation(index, 0.0, model, system, document, tuple(turns))


def service_s(gpu: Gpu, prompt_tokens: int, num_predict: int) -> float:
    """One request alone on ``gpu``, its model loaded, nothing cached (real seconds)."""
    return prompt_tokens / gpu.prefill_tps + num_predict * gpu.token_ms / 1000


def request_sizes(convs: Sequence[Conversation]) -> list[tuple[int, int]]:
    """(prompt tokens, num_predict) of every request the workload will send."""
    out = []
    for c in convs:
        answers = c.expected_answers()
        for k, t in enumerate(c.turns):
            out.append((chat_prompt_tokens(c.messages(k, answers[:k])), t.num_predict))
    return out


def capacity_rps(sizes: Sequence[tuple[int, int]], gpus: Sequence[Gpu] = GPUS) -> float:
    """Nominal capacity (real requests/s): every slot of every GPU busy with the mean request."""
    if not sizes:
        raise ValueError("no requests")
    total = 0.0
    for g in gpus:
        mean = sum(service_s(g, p, n) for p, n in sizes) / len(sizes)
        total += SLOTS / mean
    return total


def phase_starts(
    rng: random.Random, count: int, window_s: float, calm_s: float, burst_s: float, burst_x: float
) -> list[float]:
    """``count`` start times in [0, window_s): a Poisson process whose rate alternates calm
    (``calm_s`` long) and burst (``burst_s`` at ``burst_x`` times), given its count (so the
    mean rate is exactly count ÷ window). Order statistics of i.i.d. draws from the rate's
    shape, by inverting its integral."""
    edges, cum = [0.0], [0.0]
    t, calm = 0.0, True
    while t < window_s:
        length = min(calm_s if calm else burst_s, window_s - t)
        t += length
        edges.append(t)
        cum.append(cum[-1] + length * (1.0 if calm else burst_x))
        calm = not calm
    out = []
    for _ in range(count):
        u = rng.random() * cum[-1]
        i = max(1, bisect.bisect_left(cum, u))
        rate = (cum[i] - cum[i - 1]) / (edges[i] - edges[i - 1])
        out.append(edges[i - 1] + (u - cum[i - 1]) / rate)
    return sorted(out)


@dataclass(frozen=True)
class Workload:
    seed: int
    load: float
    conversations: tuple[Conversation, ...]
    window_s: float  # arrivals happen in [0, window_s)
    capacity_rps: float

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def offered_rps(self) -> float:
        return self.requests / self.window_s

    @property
    def offered_load(self) -> float:
        return self.offered_rps / self.capacity_rps


def build(seed: int, load: float, *, conversations: tuple[int, int] = CONVERSATIONS) -> Workload:
    """The seeded workload at ``load`` of the fleet's nominal capacity."""
    if not 0 < load <= 5:
        raise ValueError("load must be in (0, 5]")
    lo, hi = conversations
    if not 1 <= lo <= hi:
        raise ValueError("conversations must be a range (lo, hi) with 1 <= lo <= hi")
    rng = random.Random(seed * 1_000_003 + 17)
    convs = [_conversation(rng, i) for i in range(rng.randint(lo, hi))]
    capacity = capacity_rps(request_sizes(convs))
    requests = sum(len(c.turns) for c in convs)
    window = requests / (load * capacity)
    starts = phase_starts(
        random.Random(seed * 1_000_003 + 29), len(convs), window, CALM_S, BURST_S, BURST_X
    )
    placed = tuple(
        Conversation(c.index, s, c.model, c.system, c.document, c.turns)
        for c, s in zip(convs, starts, strict=True)
    )
    return Workload(seed, load, placed, window, capacity)
