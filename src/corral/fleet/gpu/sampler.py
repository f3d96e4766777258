"""Reading GPUs: the ``GpuSampler`` protocol, NVML (nvidia-ml-py) and the null sampler.

A sampler is synchronous and blocking (NVML calls take ~0.5 ms for a whole H100); the poller
runs it off the event loop.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from corral.errors import CorralError

MIB = 1024**2


class GpuUnavailableError(CorralError):
    """NVML cannot be used on this host (no library, no driver, no GPU)."""


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment. Any figure the source cannot give is ``None``."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_ratio: float | None = None  # 0..1, share of time a kernel ran
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    source: str = "nvml"  # nvml | dcgm | ollama
    host: str = ""  # "" for this host; the exporter's address for a DCGM reading

    @property
    def memory_free_bytes(self) -> int | None:
        if self.memory_total_bytes is None or self.memory_used_bytes is None:
            return None
        return max(self.memory_total_bytes - self.memory_used_bytes, 0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory_free_bytes"] = self.memory_free_bytes
        return data


class GpuSampler(Protocol):
    """Reads every GPU it can see; blocking, so callers run it in a thread."""

    source: str

    def sample(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class NullSampler:
    """No GPUs: what corral uses when NVML is absent or GPU features are off."""

    source = "none"

    def __init__(self, reason: str = "GPU features are off") -> None:
        self.reason = reason

    def sample(self) -> list[GpuReading]:
        return []

    def close(self) -> None:
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlSampler:
    """This host's GPUs through NVML. ``nvml`` is the ``pynvml`` module (tests pass a fake)."""

    source = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
                raise GpuUnavailableError(f"nvidia-ml-py is not installed ({exc})") from None
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise GpuUnavailableError(f"NVML is not available: {exc}") from None
        self._open = True
        try:
            self.driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            self.driver = None

    def _optional(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, or None where this GPU does not support that reading."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            if isinstance(exc, self._nvml.NVMLError_NotSupported):
                return None
            raise

    def sample(self) -> list[GpuReading]:
        """Every GPU's reading; an NVML error raises (the poller counts it and retries)."""
        nvml = self._nvml
        readings = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = self._optional(nvml.nvmlDeviceGetMemoryInfo, handle)
            util = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
            temp = self._optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
            limit_mw = self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
            readings.append(
                GpuReading(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=int(memory.total) if memory is not None else None,
                    memory_used_bytes=int(memory.used) if memory is not None else None,
                    utilization_ratio=util.gpu / 100 if util is not None else None,
                    temperature_c=float(temp) if temp is not None else None,
                    power_w=power_mw / 1000 if power_mw is not None else None,
                    power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
                )
            )
        return readings

    def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()


def open_sampler(enabled: bool = True, nvml: Any = None) -> NvmlSampler | NullSampler:
    """NVML when it works here, else a :class:`NullSampler` whose ``reason`` says why."""
    if not enabled:
        return NullSampler("GPU features are off (gpu.enabled = false)")
    try:
        return NvmlSampler(nvml)
    except GpuUnavailableError as exc:
        return NullSampler(str(exc))


def detect_local_gpus(nvml: Any = None) -> tuple[list[GpuReading], str | None]:
    """This host's GPUs read once, and None; or ``[]`` and the reason there are none."""
    sampler = open_sampler(True, nvml)
    try:
        if isinstance(sampler, NullSampler):
            return [], sampler.reason
        try:
            readings = sampler.sample()
        except Exception as exc:
            return [], f"NVML failed to read the GPUs: {exc}"
        if not readings:
            return [], "NVML found no GPU on this host"
        return readings, None
    finally:
        sampler.close()
