"""A scripted stand-in for the ``pynvml`` module, built from real H100 readings.

``../shared/data/nvml-h100-sample.json`` holds one H100 read through nvidia-ml-py, idle and
then under a load (utilization 0 → 99 %, 36 → 54 °C, 72 → 697 W). GPU 0 replays it; GPU 1, where
asked for, is an NVIDIA L4 (24 GB card: 23,034 MiB as NVML reports it) so tests can route big
models away from a small GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nvml-h100-sample.json"
MIB = 1024**2
NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    def __init__(self, value: int = 999, text: str = "Unknown Error") -> None:
        super().__init__(text)
        self.value = value


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(12, "NVML Shared Library Not Found")


class NVMLError_NotSupported(NVMLError):
    def __init__(self) -> None:
        super().__init__(3, "Not Supported")


class NVMLError_GpuIsLost(NVMLError):
    def __init__(self) -> None:
        super().__init__(15, "GPU is lost")


@dataclass
class FakeGpu:
    name: str
    uuid: str
    memory_total: int
    memory_used: int
    util_gpu: int
    temperature_c: int
    power_mw: int | None
    power_limit_mw: int


def load_sample() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SAMPLE.read_text())
    return data


def h100_idle() -> FakeGpu:
    idle = load_sample()["idle"][0]
    return FakeGpu(
        name=idle["name"],
        uuid=idle["uuid"],
        memory_total=idle["memory"]["total"],
        memory_used=idle["memory"]["used"],
        util_gpu=idle["utilization"]["gpu"],
        temperature_c=idle["temperature_c"],
        power_mw=idle["power_mw"],
        power_limit_mw=idle["power_limit_mw"],
    )


def l4_idle() -> FakeGpu:
    return FakeGpu(
        name="NVIDIA L4",
        uuid="GPU-7d2f0e1c-4b5a-9c3d-8e6f-0a1b2c3d4e5f",
        memory_total=23034 * MIB,
        memory_used=260 * MIB,
        util_gpu=0,
        temperature_c=34,
        power_mw=16000,
        power_limit_mw=72000,
    )


class FakeNvml:
    """Quacks like ``pynvml`` for what corral calls. Mutate ``gpus`` to script readings."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu] | None = None, *, missing: bool = False) -> None:
        self.gpus = [h100_idle()] if gpus is None else gpus
        self.missing = missing
        self.fail_next = 0  # the next N samples raise GpuIsLost
        self.initialized = False
        self.shutdowns = 0
        self._load = load_sample()["under_load"]
        self._step = -1

    # Scripting --------------------------------------------------------------------------------

    def replay_load(self) -> bool:
        """Move GPU 0 to the next reading of the recorded H100 load; False past the end."""
        self._step += 1
        if self._step >= len(self._load):
            return False
        step, gpu = self._load[self._step], self.gpus[0]
        gpu.util_gpu = step["util"]["gpu"]
        gpu.memory_used = step["mem_used"]
        gpu.temperature_c = step["temp"]
        gpu.power_mw = step["power_mw"]
        return True

    # The pynvml surface -----------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.missing:
            raise NVMLError_LibraryNotFound()
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(load_sample()["driver"])

    def nvmlDeviceGetCount(self) -> int:
        if self.fail_next:
            self.fail_next -= 1
            raise NVMLError_GpuIsLost()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        return SimpleNamespace(
            total=gpu.memory_total, used=gpu.memory_used, free=gpu.memory_total - gpu.memory_used
        )

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        return SimpleNamespace(gpu=gpu.util_gpu, memory=0)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        if gpu.power_mw is None:
            raise NVMLError_NotSupported()
        return gpu.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: FakeGpu) -> int:
        return gpu.power_limit_mw
