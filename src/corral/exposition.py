"""One host's ``/metrics`` under ``serve --workers``: every worker's metrics, merged.

A scrape reaches one worker (the kernel picks), so each worker also serves its own exposition
on a private unix socket (connect, read to the end), and the worker a scrape reaches reads its
siblings' there, each within :data:`SIBLING_TIMEOUT_S`, and answers for the whole host as one
corral would: the same names, label sets, HELP and TYPE lines. Counters and histograms are
summed per label set; each gauge follows its rule in :data:`GAUGE_RULES`. A sibling that does
not answer in time is stood in for by its last answer, up to :data:`STALE_S` old (leaving its
counters out would read as a reset to Prometheus), and ``corral_workers_scraped`` falls below
``corral_workers``; after that it is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

SIBLING_TIMEOUT_S = 0.25
STALE_S = 60.0  # how long a sibling's last answer stands in for one it did not give
_END = b"# EOF\n"  # a sibling's exposition ends so (as OpenMetrics does): a cut one is told apart

# How a gauge reported by several workers becomes one value (per label set).
# sum: each worker's own share (its queue, its connections).
# max: a fleet-wide reading every worker takes for itself (slots are counted in the cluster's
#   Redis, the strategy and owed operations are shared state, GPU and residency readings come
#   from the same backends): equal but for when each last looked.
# min: up only while every worker says so (each worker probes the backends itself).
GAUGE_RULES: dict[str, str] = {
    "corral_queue_depth": "sum",
    "corral_open_connections": "sum",
    "corral_cluster_leader": "sum",  # 1 when a worker on this host leads the cluster
    "corral_backend_up": "min",
    "corral_cluster_up": "min",
    "corral_backend_in_flight": "max",
    "corral_backend_slot_utilization_ratio": "max",
    "corral_strategy_info": "max",
    "corral_model_replays_pending": "max",
    "corral_model_resident": "max",
    "corral_gpu_utilization_ratio": "max",
    "corral_gpu_memory_used_bytes": "max",
    "corral_gpu_memory_total_bytes": "max",
    "corral_gpu_temperature_celsius": "max",
    "corral_gpu_power_watts": "max",
}
_COMBINE: dict[str, Callable[[float, float], float]] = {
    "sum": lambda a, b: a + b,
    "max": max,
    "min": min,
}


def merge(texts: Sequence[str | bytes], workers: int | None = None, *, stale: int = 0) -> bytes:
    """Merge expositions (text format) into one, families in the order first seen.

    An exposition that does not parse is left out. With ``workers``, adds ``corral_workers``
    (that many) and ``corral_workers_scraped`` (the expositions merged, less the ``stale``
    ones: earlier answers standing in for workers that did not answer now).
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    scraped = 0
    for text in texts:
        try:
            parsed = list(text_string_to_metric_families(_text(text)))
        except (ValueError, UnicodeDecodeError):
            continue  # not an exposition: left out
        scraped += 1
        for family in parsed:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            combine = _rule(family)
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                found = merged.get(key)
                if found is None:
                    merged[key] = sample
                else:
                    value = combine(sample.name)(found.value, sample.value)
                    merged[key] = found._replace(value=value)
    out = list(families.values())
    for family in out:
        family.samples = list(values[family.name].values())
    if workers is not None:
        out.append(
            GaugeMetricFamily(
                "corral_workers",
                "Worker processes on this host (serve --workers); this scrape is their sum.",
                value=workers,
            )
        )
        out.append(
            GaugeMetricFamily(
                "corral_workers_scraped",
                "Workers that answered this scrape; below corral_workers when one did not "
                f"within {SIBLING_TIMEOUT_S} s (its last answer, up to {STALE_S:g} s old, "
                "stands in for it).",
                value=max(0, scraped - stale),
            )
        )
    return generate_latest(_Families(out))


def _text(text: str | bytes) -> str:
    return text.decode() if isinstance(text, bytes) else text


def _rule(family: Metric) -> Callable[[str], Callable[[float, float], float]]:
    """The combining function per sample name of ``family``."""
    if family.type == "gauge":
        combine = _COMBINE[GAUGE_RULES.get(family.name, "sum")]
        return lambda _name: combine
    add = _COMBINE["sum"]
    # Counters, histograms, summaries add up; a *_created timestamp keeps the earliest.
    return lambda name: min if name.endswith("_created") else add


class _Families:
    """What ``generate_latest`` reads: a ``collect()`` of metric families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


async def serve_exposition(path: str, render: Callable[[], bytes]) -> asyncio.AbstractServer:
    """A unix socket at ``path`` that writes ``render()`` (and an end line) to each connection
    and closes it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(render() + _END)
            await writer.drain()
        except OSError:
            pass  # the reader gave up (its deadline passed)
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return await asyncio.start_unix_server(answer, path)


async def read_exposition(path: str, timeout_s: float = SIBLING_TIMEOUT_S) -> bytes | None:
    """A sibling's exposition, or None when it does not answer within ``timeout_s``."""
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(path)
            text = await reader.read()
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
    # Without its last line it was cut short (its worker died while writing it).
    return text[: -len(_END)] if text.endswith(_END) else None


class HostMetrics:
    """A worker's ``/metrics``: its own exposition plus its siblings', merged."""

    def __init__(self, own: Callable[[], bytes], siblings: Sequence[str], *, workers: int) -> None:
        self._own = own
        self.siblings = tuple(siblings)
        self.workers = workers
        self._last: dict[str, tuple[bytes, float]] = {}  # sibling -> its last answer, when

    async def render(self) -> bytes:
        own = self._own()
        read = await asyncio.gather(*(read_exposition(p) for p in self.siblings))
        now = time.monotonic()
        texts, stale = [own], 0
        for path, text in zip(self.siblings, read, strict=True):
            if text is not None:
                self._last[path] = (text, now)
                texts.append(text)
            elif path in self._last and now - self._last[path][1] <= STALE_S:
                texts.append(self._last[path][0])
                stale += 1
        # Parsing is pure Python: off the event loop, so requests keep flowing meanwhile.
        return await asyncio.to_thread(merge, texts, self.workers, stale=stale)
