"""GpuPoller: reads the GPUs every ``gpu.poll_s`` and tells routing what it needs to know.

Sources, per backend: this host's GPUs through NVML (``gpu = 0`` / ``"GPU-…"`` / a list), a
remote host's DCGM exporter (``gpu_metrics_url``), else coarse VRAM use from Ollama's
``/api/ps``. After every poll each backend's ``vram_total_bytes``, ``vram_free_bytes`` and
``gpu_hot`` are set, so routing reads plain attributes and never waits on a GPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from corral.config import GpuSettings
from corral.errors import UpstreamMalformedError
from corral.fleet.backends import BackendRegistry, BackendState, Clock
from corral.fleet.gpu.dcgm import parse_dcgm
from corral.fleet.gpu.sampler import GpuReading, GpuSampler, NullSampler
from corral.metrics import Metrics

log = structlog.get_logger("corral.gpu")

# A GPU with requests in flight but below this utilization for LOW_UTIL_POLLS polls in a row
# is starved (requests stuck before the GPU, CPU offload, a slow client): logged once.
LOW_UTIL_RATIO = 0.5
LOW_UTIL_POLLS = 2
# Readings older than this many poll intervals are dropped rather than trusted.
STALE_POLLS = 3


def gpu_key(reading: GpuReading) -> str:
    """A GPU's identity across polls: its UUID, else host and index."""
    return reading.uuid or f"{reading.host}#{reading.index}"


def _sum(values: Sequence[float | int | None]) -> Any:
    """The sum, or None when the list is empty or any value is unknown."""
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def _refs(gpu: int | str | list[int | str] | None) -> list[int | str]:
    if gpu is None:
        return []
    return list(gpu) if isinstance(gpu, list) else [gpu]


def _matches(reading: GpuReading, ref: int | str) -> bool:
    if isinstance(ref, int):
        return reading.index == ref
    return reading.uuid.lower() == ref.lower()


@dataclass
class _Remote:
    readings: list[GpuReading]
    at: float
    error: str | None = None


class GpuPoller:
    """Owns the latest GPU readings and applies them to the backends."""

    def __init__(
        self,
        registry: BackendRegistry,
        settings: GpuSettings,
        metrics: Metrics,
        sampler: GpuSampler,
        *,
        fetch: Any = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.sampler = sampler
        self._fetch = fetch  # async (url, timeout_s) -> bytes: the DCGM page
        self._clock = clock
        self.local: list[GpuReading] = []
        self.local_at: float | None = None
        self.local_error: str | None = None
        self.remote: dict[str, _Remote] = {}
        self.hot: set[str] = set()
        self._low_streak: dict[str, int] = {}
        self._low: set[str] = set()
        self._warned: set[tuple[str, str]] = set()
        metrics.watch_gpus(self.series)
        registry.on_change(lambda _event, _backend: self.apply())

    @property
    def nvml(self) -> bool:
        """NVML works on this host."""
        return not isinstance(self.sampler, NullSampler)

    async def run(self) -> None:
        """Poll forever; each round catches, counts and logs its own errors."""
        while True:
            try:
                await self.poll()
            except Exception:
                log.exception("GPU poll failed")
            await asyncio.sleep(self.settings.poll_s)

    async def poll(self) -> None:
        """Read every source once, then apply the readings to the backends."""
        await asyncio.gather(self._poll_local(), self._poll_remote())
        self.apply()

    async def _poll_local(self) -> None:
        if not self.nvml:
            return
        try:
            readings = await asyncio.to_thread(self.sampler.sample)
        except Exception as exc:
            self.metrics.child(self.metrics.gpu_poll_errors, "nvml").inc()
            if self.local_error is None:
                log.warning("NVML read failed; retrying every poll", error=str(exc))
            self.local_error = str(exc)
            return
        if self.local_error is not None:
            log.info("NVML reads again")
            self.local_error = None
        self.local = readings
        self.local_at = self._clock()

    async def _poll_remote(self) -> None:
        urls = {b.gpu_metrics_url for b in self.registry.all() if b.gpu_metrics_url}
        for gone in set(self.remote) - urls:
            del self.remote[gone]
        if urls and self._fetch is not None:
            await asyncio.gather(*(self._scrape(url) for url in urls))

    async def _scrape(self, url: str) -> None:
        timeout = max(1.0, min(self.settings.poll_s, 5.0))
        host = urlsplit(url).hostname or url
        try:
            page = await self._fetch(url, timeout)
            readings = parse_dcgm(page.decode(errors="replace"), host=host)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.child(self.metrics.gpu_poll_errors, "dcgm").inc()
            if isinstance(exc, UpstreamMalformedError):  # a page over the cap, a redirect
                for b in self.registry.all():
                    if b.gpu_metrics_url == url:
                        self.metrics.backend_malformed.labels(b.id, exc.reason).inc()
            old = self.remote.get(url)
            if old is None or old.error is None:
                log.warning("GPU metrics unreadable", url=url, error=str(exc) or repr(exc))
            if old is None:
                self.remote[url] = _Remote([], 0.0, str(exc) or repr(exc))
            else:
                old.error = str(exc) or repr(exc)
            return
        if (old := self.remote.get(url)) is not None and old.error is not None:
            log.info("GPU metrics readable again", url=url)
        self.remote[url] = _Remote(readings, self._clock())

    def _fresh(self, at: float | None) -> bool:
        return at is not None and self._clock() - at <= STALE_POLLS * self.settings.poll_s + 5

    # Mapping ------------------------------------------------------------------------------

    def gpus_of(self, backend: BackendState) -> list[GpuReading]:
        """The GPUs behind ``backend`` (fresh readings only); [] when none is known."""
        refs = _refs(backend.gpu)
        if backend.gpu_metrics_url:
            remote = self.remote.get(backend.gpu_metrics_url)
            if remote is None or not self._fresh(remote.at):
                return []
            pool = remote.readings
        elif refs and self._fresh(self.local_at):
            pool = self.local
        else:
            return []
        if not refs:
            return list(pool)
        found = []
        for ref in refs:
            match = next((r for r in pool if _matches(r, ref)), None)
            if match is not None:
                found.append(match)
            elif (backend.id, str(ref)) not in self._warned:
                self._warned.add((backend.id, str(ref)))
                log.warning("backend's GPU not found", backend=backend.id, gpu=str(ref))
        return found

    def ollama_vram_used(self, backend: BackendState) -> int:
        """VRAM that Ollama's ``/api/ps`` says the backend's loaded models hold."""
        return sum(int(m.get("size_vram") or 0) for m in backend.resident.values())

    def apply(self) -> None:
        """Set every backend's VRAM and heat from the latest readings; log heat episodes."""
        seen: set[str] = set()
        backends = self.registry.all()
        for reading in self._all_readings():
            self._track_heat(reading)
            seen.add(gpu_key(reading))
        for gone in self.hot - seen:
            self.hot.discard(gone)
        for backend in backends:
            gpus = self.gpus_of(backend)
            backend.gpu_hot = any(gpu_key(g) in self.hot for g in gpus)
            backend.vram_total_bytes = _sum([g.memory_total_bytes for g in gpus])
            backend.vram_free_bytes = _sum([g.memory_free_bytes for g in gpus])
        self._track_low_util(backends)

    def _all_readings(self) -> list[GpuReading]:
        readings = list(self.local) if self._fresh(self.local_at) else []
        for remote in self.remote.values():
            if self._fresh(remote.at):
                readings.extend(remote.readings)
        return readings

    def _track_heat(self, reading: GpuReading) -> None:
        key, temp = gpu_key(reading), reading.temperature_c
        if temp is None:
            return
        limit = self.settings.max_temp_c
        if key not in self.hot and temp >= limit:
            self.hot.add(key)
            self._event(reading, "hot")
            log.warning(
                "GPU hot; its backends are avoided until it cools",
                gpu=reading.index,
                uuid=reading.uuid,
                temperature_c=temp,
                max_temp_c=limit,
                resume_below_c=limit - self.settings.temp_hysteresis_c,
            )
        elif key in self.hot and temp < limit - self.settings.temp_hysteresis_c:
            self.hot.discard(key)
            log.info("GPU cooled; back in rotation", gpu=reading.index, temperature_c=temp)

    def _track_low_util(self, backends: Sequence[BackendState]) -> None:
        in_flight: dict[str, int] = {}
        by_key: dict[str, GpuReading] = {}
        for backend in backends:
            for gpu in self.gpus_of(backend):
                key = gpu_key(gpu)
                by_key[key] = gpu
                in_flight[key] = in_flight.get(key, 0) + backend.in_flight
        for key, gpu in by_key.items():
            util = gpu.utilization_ratio
            if in_flight[key] > 0 and util is not None and util < LOW_UTIL_RATIO:
                streak = self._low_streak[key] = self._low_streak.get(key, 0) + 1
                if streak >= LOW_UTIL_POLLS and key not in self._low:
                    self._low.add(key)
                    self._event(gpu, "underutilized")
                    log.info(
                        "GPU underutilized while serving requests",
                        gpu=gpu.index,
                        uuid=gpu.uuid,
                        utilization=util,
                        in_flight=in_flight[key],
                    )
            else:
                self._low_streak.pop(key, None)
                self._low.discard(key)

    def _event(self, reading: GpuReading, event: str) -> None:
        labels = self._labels(reading)
        self.metrics.gpu_events.labels(*labels, event).inc()

    # Views ----------------------------------------------------------------------------------

    def _backends_on(self) -> dict[str, list[str]]:
        on: dict[str, list[str]] = {}
        for backend in self.registry.all():
            for gpu in self.gpus_of(backend):
                on.setdefault(gpu_key(gpu), []).append(backend.id)
        return on

    def _labels(
        self, reading: GpuReading, on: dict[str, list[str]] | None = None
    ) -> tuple[str, ...]:
        on = self._backends_on() if on is None else on
        backends = ",".join(sorted(on.get(gpu_key(reading), [])))
        return (str(reading.index), reading.uuid, reading.name, backends)

    def series(self) -> list[tuple[tuple[str, ...], GpuReading]]:
        """(gpu, uuid, name, backend) labels and the reading, for every GPU: /metrics."""
        on = self._backends_on()
        return [(self._labels(r, on), r) for r in self._all_readings()]

    def gpu_entries(self) -> list[dict[str, Any]]:
        """Every GPU known, with the backends on it: the admin API's ``gpus``."""
        on = self._backends_on()
        entries = []
        for reading in self._all_readings():
            key = gpu_key(reading)
            entry = reading.to_json()
            entry.update(key=key, hot=key in self.hot, backends=sorted(on.get(key, [])))
            entries.append(entry)
        for backend in self.registry.all():
            if backend.gpu_metrics_url or (backend.gpu is not None and self.gpus_of(backend)):
                continue
            if not backend.resident:
                continue
            coarse = GpuReading(
                index=-1,
                uuid="",
                name="",
                memory_used_bytes=self.ollama_vram_used(backend),
                source="ollama",
                host=backend.id,
            )
            entry = coarse.to_json()
            entry.update(key=f"ollama:{backend.id}", hot=False, backends=[backend.id])
            entries.append(entry)
        # This host's GPUs first, then by the backends on them.
        entries.sort(key=lambda e: (e["source"] != "nvml", e["backends"][:1], e["index"]))
        return entries

    def backend_summary(self, backend: BackendState) -> dict[str, Any] | None:
        """The backend's GPU(s) in one line: the admin API's ``loads`` entries."""
        gpus = self.gpus_of(backend)
        if not gpus:
            if not backend.resident:
                return None
            return {
                "source": "ollama",
                "name": None,
                "memory_used_bytes": self.ollama_vram_used(backend),
                "memory_total_bytes": None,
                "utilization_ratio": None,
                "temperature_c": None,
                "power_w": None,
                "hot": False,
            }
        utils = [g.utilization_ratio for g in gpus if g.utilization_ratio is not None]
        temps = [g.temperature_c for g in gpus if g.temperature_c is not None]
        powers = [g.power_w for g in gpus if g.power_w is not None]
        names = " + ".join(sorted({g.name for g in gpus}))
        return {
            "source": gpus[0].source,
            "name": names if len(gpus) == 1 else f"{len(gpus)}× {names}",
            "indexes": [g.index for g in gpus],
            "uuids": [g.uuid for g in gpus],
            "memory_used_bytes": _sum([g.memory_used_bytes for g in gpus]),
            "memory_total_bytes": backend.vram_total_bytes,
            "utilization_ratio": sum(utils) / len(utils) if utils else None,
            "temperature_c": max(temps) if temps else None,
            "power_w": sum(powers) if powers else None,
            "hot": backend.gpu_hot,
        }

    def status(self) -> dict[str, Any]:
        """The admin API's ``GET /gpus`` answer."""
        reason = getattr(self.sampler, "reason", None)
        return {
            "nvml": self.nvml,
            "nvml_reason": reason,
            "nvml_error": self.local_error,
            "driver": getattr(self.sampler, "driver", None),
            "poll_s": self.settings.poll_s,
            "max_temp_c": self.settings.max_temp_c,
            "temp_hysteresis_c": self.settings.temp_hysteresis_c,
            "exporters": {
                url: {"ok": r.error is None, "error": r.error, "gpus": len(r.readings)}
                for url, r in sorted(self.remote.items())
            },
            "gpus": self.gpu_entries(),
        }

    def close(self) -> None:
        self.sampler.close()
