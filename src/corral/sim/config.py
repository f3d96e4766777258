"""Configuration of the simulator: the models it holds, its timing, its limits and its faults.

Everything here is a plain mutable dataclass on purpose: the running app reads these objects on
every request, so a test (or ``PUT /_sim/config``) can change them while the server runs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

GIB = 1024**3
GB = 1000**3


def _digest_of(name: str) -> str:
    """A stable fake manifest digest (64 hex, no ``sha256:`` prefix) derived from the name."""
    return hashlib.sha256(name.encode()).hexdigest()


@dataclass
class SimModel:
    """One model the simulator can hold; the fields mirror what /api/tags, /api/show and /api/ps
    report. ``vram_size_bytes`` is the loaded runner footprint (0: same as ``size_bytes``)."""

    name: str
    size_bytes: int
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    family: str = "llama"
    context_length: int = 131072
    embedding_length: int = 3072
    block_count: int = 28
    capabilities: tuple[str, ...] = ("completion", "tools")
    vram_size_bytes: int = 0
    digest: str = ""
    modified_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = _digest_of(self.name)
        if not self.modified_at:
            self.modified_at = time.time()

    @property
    def footprint_bytes(self) -> int:
        """Memory the loaded runner needs (what /api/ps calls ``size``)."""
        return self.vram_size_bytes or self.size_bytes

    def renamed(self, name: str) -> SimModel:
        """A copy under another name (its own digest, modified now), as copy/create produce."""
        return replace(self, name=name, digest=_digest_of(name), modified_at=time.time())


def _llama32() -> SimModel:
    return SimModel("llama3.2:latest", 2019393189)


def _qwen7b() -> SimModel:
    return SimModel(
        "qwen2.5:7b",
        4683087332,
        parameter_size="7.6B",
        family="qwen2",
        context_length=32768,
        embedding_length=3584,
    )


def _minilm() -> SimModel:
    return SimModel(
        "all-minilm:latest",
        45960996,
        parameter_size="23M",
        quantization_level="F16",
        family="bert",
        context_length=512,
        embedding_length=384,
        block_count=6,
        capabilities=("embedding",),
    )


def default_models() -> list[SimModel]:
    """The models a fresh simulator holds: two chat models and one embedding model.

    Their ``modified_at`` decrease in list order, so /api/tags lists them in this order.
    """
    models = [_llama32(), _qwen7b(), _minilm()]
    now = time.time()
    for i, m in enumerate(models):
        m.modified_at = now - i
    return models


# The simulated registry: what /api/pull can fetch. Any other name (for example one containing
# "doesnotexist") fails the way Ollama fails for a manifest that does not exist.
def registry_models() -> dict[str, SimModel]:
    """Pullable models by canonical name (``name:tag``)."""
    extra = [
        SimModel(
            "mistral:latest",
            4113301824,
            parameter_size="7.2B",
            quantization_level="Q4_0",
            context_length=32768,
            embedding_length=4096,
            block_count=32,
        ),
        SimModel(
            "llama3.1:8b", 4920753328, parameter_size="8.0B", embedding_length=4096, block_count=32
        ),
        SimModel(
            "gemma3:1b",
            815319791,
            parameter_size="1.0B",
            family="gemma3",
            context_length=32768,
            embedding_length=1152,
            block_count=26,
            capabilities=("completion",),
        ),
        SimModel(
            "qwen2.5:0.5b",
            397821319,
            parameter_size="494.03M",
            family="qwen2",
            context_length=32768,
            embedding_length=896,
            block_count=24,
        ),
        SimModel(
            "tinyllama:latest",
            637700138,
            parameter_size="1B",
            quantization_level="Q4_0",
            context_length=2048,
            embedding_length=2048,
            block_count=22,
            capabilities=("completion",),
        ),
        SimModel(
            "nomic-embed-text:latest",
            274302450,
            parameter_size="137M",
            quantization_level="F16",
            family="nomic-bert",
            context_length=2048,
            embedding_length=768,
            block_count=12,
            capabilities=("embedding",),
        ),
    ]
    return {m.name: m for m in [_llama32(), _qwen7b(), _minilm(), *extra]}


@dataclass
class Faults:
    """Injected failures, read on every inference request (settable at run time).

    - ``error_rate``: fraction of inference requests answered 500 before any byte.
    - ``hang``: inference requests never answer until the client goes away.
    - ``slow_s``: extra delay before the first byte.
    - ``drop_after_tokens``: abort the TCP connection after N tokens, without a final line.
    - ``busy``: every inference request gets Ollama's 503 "server busy".
    - ``mid_stream_error_after``: after N tokens emit ``{"error": ...}`` (status stays 200).
    """

    error_rate: float = 0.0
    hang: bool = False
    slow_s: float = 0.0
    drop_after_tokens: int | None = None
    busy: bool = False
    mid_stream_error_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The faults as a JSON object (field order as declared)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update; unknown keys and wrong types raise ValueError."""
        _update(self, changes, _FAULT_TYPES)


@dataclass
class SimConfig:
    """Everything a simulated Ollama server is: identity, models, timing, limits, faults.

    Times are seconds. ``num_parallel`` is per loaded model (extra requests queue without limit,
    as in Ollama); ``max_queue`` bounds only the requests waiting for a model load.
    ``max_loaded_models`` caps the runners loaded at once (Ollama's ``OLLAMA_MAX_LOADED_MODELS``,
    3 per GPU by default; 0 is no cap). A load takes ``load_s`` plus the runner's footprint at
    ``load_gbps`` GB/s (0: no size-dependent part). Prompt processing takes ``ttft_s`` plus the
    prompt tokens the slot's prompt cache does not hold at ``prefill_tps`` tokens/s (0: none).
    ``shared_compute``: models on the GPU take turns, so with k runners generating at once each
    prefills and decodes k times slower (one model's parallel requests batch, as on a GPU).
    ``pull_delay_s`` is the pause between pull/push/create progress lines. ``check_host``
    rejects Host headers the way an Ollama bound to loopback does (403, empty body).

    The ``gpu_*`` fields describe the one GPU ``GET /_sim/dcgm`` reports: an empty
    ``gpu_name`` or ``gpu_uuid`` is derived (from ``vram_bytes``, from ``name``);
    ``gpu_temp_c`` and ``gpu_util_pct``, when set, are reported exactly instead of the values
    that follow the load.
    """

    name: str = "sim"
    version: str = "0.33.0"
    models: list[SimModel] = field(default_factory=default_models)
    ttft_s: float = 0.0
    token_interval_s: float = 0.0
    tokens: int = 16
    load_s: float = 0.0
    load_gbps: float = 0.0
    prefill_tps: float = 0.0
    max_loaded_models: int = 3
    keep_alive_s: float = 300.0
    num_parallel: int = 4
    max_queue: int = 512
    vram_bytes: int = 24 * GIB
    pull_delay_s: float = 0.0
    check_host: bool = False
    faults: Faults = field(default_factory=Faults)
    gpu_name: str = ""
    gpu_uuid: str = ""
    gpu_index: int = 0
    gpu_temp_c: float | None = None
    gpu_util_pct: float | None = None
    power_limit_w: float = 350.0
    shared_compute: bool = False

    @property
    def reported_gpu_name(self) -> str:
        """The GPU's model name: ``gpu_name``, else "Simulated GPU <vram>GB"."""
        return self.gpu_name or f"Simulated GPU {round(self.vram_bytes / GIB)}GB"

    @property
    def reported_gpu_uuid(self) -> str:
        """The GPU's UUID: ``gpu_uuid``, else ``GPU-`` and a UUID-shaped hash of ``name``."""
        if self.gpu_uuid:
            return self.gpu_uuid
        h = hashlib.sha256(f"gpu:{self.name}".encode()).hexdigest()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

    def timing_json(self) -> dict[str, Any]:
        """The run-time tunables (what ``PUT /_sim/config`` accepts) as JSON; the GPU's name
        and UUID as reported (derived when not set)."""
        data = {k: getattr(self, k) for k in _CONFIG_TYPES}
        data["gpu_name"], data["gpu_uuid"] = self.reported_gpu_name, self.reported_gpu_uuid
        return data

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update of the run-time tunables; bad keys/types raise ValueError."""
        _update(self, changes, _CONFIG_TYPES)


_FAULT_TYPES: dict[str, tuple[type, ...]] = {
    "error_rate": (int, float),
    "hang": (bool,),
    "slow_s": (int, float),
    "drop_after_tokens": (int, type(None)),
    "busy": (bool,),
    "mid_stream_error_after": (int, type(None)),
}

_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "ttft_s": (int, float),
    "token_interval_s": (int, float),
    "tokens": (int,),
    "load_s": (int, float),
    "load_gbps": (int, float),
    "prefill_tps": (int, float),
    "max_loaded_models": (int,),
    "num_parallel": (int,),
    "keep_alive_s": (int, float),
    "max_queue": (int,),
    "pull_delay_s": (int, float),
    "gpu_name": (str,),
    "gpu_uuid": (str,),
    "gpu_index": (int,),
    "gpu_temp_c": (int, float, type(None)),
    "gpu_util_pct": (int, float, type(None)),
    "power_limit_w": (int, float),
    "shared_compute": (bool,),
}


def _update(target: object, changes: dict[str, Any], types: dict[str, tuple[type, ...]]) -> None:
    # Validate everything first so a bad request changes nothing.
    for key, value in changes.items():
        if key not in types:
            raise ValueError(f"unknown field {key!r}; known: {', '.join(types)}")
        allowed = types[key]
        # bool is an int subclass; only accept it where bool is the declared type.
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise ValueError(f"field {key!r} has the wrong type {type(value).__name__}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"field {key!r} must not be negative")
        if key == "num_parallel" and isinstance(value, int) and value < 1:
            raise ValueError("field 'num_parallel' must be at least 1")
        if key == "gpu_util_pct" and isinstance(value, int | float) and value > 100:
            raise ValueError("field 'gpu_util_pct' must be at most 100")
    for key, value in changes.items():
        setattr(target, key, value)
