"""Models per backend: installed (``/api/tags``) and resident (``/api/ps``), and where they run.

The health checker reads both lists on every probe (every ``health.interval_s``, at once when a
backend recovers, and after model-management calls); :func:`update` turns them into the
backend's ``models``, ``model_sizes`` and ``resident``. Requests routed to a backend that does
not hold their model yet mark it *loading* there, so the next requests for it follow instead
of starting a second cold load elsewhere before the next ``/api/ps`` shows it.

A backend's answers are not trusted: :func:`model_entries` keeps the entries of a model list
that have the shape Ollama gives them and counts the rest, and :func:`version_of` keeps a
version that looks like one. Both serve the health probes and the merged listings.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any, Literal

from prometheus_client.core import GaugeMetricFamily

from corral.errors import UpstreamBadBodyError
from corral.fleet.backends import BackendRegistry, BackendState, normalize_model
from corral.metrics import Metrics

Where = Literal["gpu", "partial", "cpu"]
# A "loading" mark lasts until /api/ps lists the model, or this long.
LOADING_TTL_S = 120.0
# Longer names or versions than any Ollama gives are not taken.
_MAX_NAME = 512
# Models one Ollama can hold loaded at once, with room to spare (OLLAMA_MAX_LOADED_MODELS is 3
# per GPU): a backend claiming more is not believed past it, and corral_model_resident keeps
# a bounded number of series.
MAX_RESIDENT = 64
_MAX_VERSION = 64
_VERSION = re.compile(r"[vV]?[0-9][0-9A-Za-z.+~_-]*")
# Fields of a model entry that, when present, must be counts of bytes.
_SIZES = ("size", "size_vram")


def model_entries(answer: Any, what: str = "model list") -> tuple[list[dict[str, Any]], int]:
    """The well-formed entries of an ``/api/tags`` or ``/api/ps`` answer, and how many were
    skipped (not an object, no string name, a size that is no count). An answer without
    ``models`` has none; one that is no model list at all raises UpstreamBadBodyError."""
    if answer is None:
        return [], 0
    if not isinstance(answer, dict):
        raise UpstreamBadBodyError(f"{what}: not a JSON object")
    models = answer.get("models")
    if models is None:
        return [], 0
    if not isinstance(models, list):
        raise UpstreamBadBodyError(f"{what}: models is not a list")
    good = [m for m in models if _well_formed(m)]
    return good, len(models) - len(good)


def _well_formed(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    name, model = entry.get("name"), entry.get("model")
    if name is not None and not isinstance(name, str):
        return False
    if model is not None and not isinstance(model, str):
        return False
    key = name or model
    if not key or len(key) > _MAX_NAME:
        return False
    for field in _SIZES:
        value = entry.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return False
        if value is not None and value < 0:
            return False
    return True


def entry_name(entry: dict[str, Any]) -> str:
    """A well-formed entry's name (``name``, else ``model``)."""
    name: str = entry.get("name") or entry["model"]
    return name


def version_of(answer: Any) -> str | None:
    """The version in an ``/api/version`` answer when it looks like one (``0.12.3``,
    ``v0.5.0-rc2``, at most 64 characters); None otherwise."""
    if not isinstance(answer, dict):
        return None
    version = answer.get("version")
    if isinstance(version, str) and len(version) <= _MAX_VERSION and _VERSION.fullmatch(version):
        return version
    return None


def residency(size: Any, size_vram: Any) -> Where | None:
    """Ollama's own rule (``ollama ps``' PROCESSOR column): all on GPU only when
    ``size_vram == size``; none on GPU when ``size_vram == 0``; else partly; None: unknown."""
    if not isinstance(size, int) or not isinstance(size_vram, int):
        return None
    if size_vram == 0:
        return "cpu"
    if size_vram == size:
        return "gpu"
    if size_vram > size or size == 0:
        return None
    return "partial"


def where(backend: BackendState, model_key: str) -> Where | None:
    """Where ``model_key`` runs on ``backend`` now; None when it is not loaded there."""
    entry = backend.resident.get(model_key)
    if entry is None:
        return None
    return residency(entry.get("size"), entry.get("size_vram"))


class Unusable:
    """Counts backend answers corral could not use (``corral_backend_malformed``) and logs
    them: the first of each reason per backend as a warning, the rest at debug level."""

    def __init__(self, metrics: Metrics | None, logger: Any, event: str) -> None:
        self.metrics = metrics
        self.log = logger
        self.event = event
        self._noted: set[tuple[str, str]] = set()

    def note(self, backend_id: str, reason: str, detail: str, count: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.backend_malformed.labels(backend=backend_id, reason=reason).inc(count)
        seen = (backend_id, reason)
        first = seen not in self._noted
        if first:
            self._noted.add(seen)
        (self.log.warning if first else self.log.debug)(
            self.event, backend=backend_id, reason=reason, detail=detail[:300], count=count
        )


def update(backend: BackendState, tags: Any, ps: Any, *, now: float | None = None) -> int:
    """Take a backend's ``/api/tags`` and ``/api/ps`` answers; returns how many entries were
    skipped as malformed. An answer that is no model list at all raises UpstreamBadBodyError
    and changes nothing."""
    installed, bad_tags = model_entries(tags, "/api/tags")
    loaded, bad_ps = model_entries(ps, "/api/ps")
    names: list[str] = []
    sizes: dict[str, int] = {}
    for m in installed:
        name = entry_name(m)
        names.append(name)
        size = m.get("size")
        if isinstance(size, int) and size > 0:
            sizes[normalize_model(name)] = size
    backend.model_names = names
    backend.models = {normalize_model(n) for n in names}
    backend.model_sizes = sizes
    resident: dict[str, dict[str, Any]] = {}
    for m in loaded[:MAX_RESIDENT]:
        resident[normalize_model(entry_name(m))] = m
    backend.resident = resident
    now = time.monotonic() if now is None else now
    backend.loading = {
        key: since
        for key, since in backend.loading.items()
        if key not in resident and now - since < LOADING_TTL_S
    }
    return bad_tags + bad_ps


def mark_loading(backend: BackendState, model_key: str, now: float | None = None) -> None:
    """A request for ``model_key`` went to ``backend``, which did not hold it: it loads now."""
    if model_key not in backend.resident:
        backend.loading.setdefault(model_key, time.monotonic() if now is None else now)


def models_view(registry: BackendRegistry) -> list[dict[str, Any]]:
    """Every model some backend has installed or loaded: the admin API's ``GET /models``."""
    names: dict[str, str] = {}
    for b in registry.all():
        for name in b.model_names:
            names.setdefault(normalize_model(name), name)
        for key in b.models:
            names.setdefault(key, key)
        for key, ps_entry in b.resident.items():
            names.setdefault(key, ps_entry.get("name") or key)
    models = []
    for key in sorted(names):
        backends: dict[str, Any] = {}
        for b in registry.all():
            entry = b.resident.get(key)
            installed = key in b.models
            if not installed and entry is None:
                continue
            backends[b.id] = {
                "installed": installed,
                "resident": where(b, key) if entry is not None else None,
                "loading": key in b.loading,
                "size": entry.get("size") if entry else b.model_sizes.get(key),
                "size_vram": entry.get("size_vram") if entry else None,
                "expires_at": entry.get("expires_at") if entry else None,
                # The context length its runner was loaded with (Ollama's /api/ps says it).
                "context_length": _int(entry.get("context_length")) if entry else None,
            }
        models.append({"name": names[key], "backends": backends})
    return models


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ResidencyCollector:
    """``corral_model_resident{backend,model,where}``: 1 per model loaded, read at scrape time."""

    def __init__(self, registry: BackendRegistry) -> None:
        self._registry = registry

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "corral_model_resident",
            "Models loaded per backend (1), by where they run: gpu, partial (split with the "
            "CPU) or cpu, by Ollama's /api/ps rule.",
            labels=("backend", "model", "where"),
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for b in self._registry.all():
            for key in b.resident:
                family.add_metric([b.id, key, where(b, key) or "unknown"], 1.0)
        yield family
