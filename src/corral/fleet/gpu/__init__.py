"""GPUs: samplers (NVML, DCGM exporter, null), the poller, and what routing asks of them."""

from corral.fleet.gpu.sampler import (
    GpuReading,
    GpuSampler,
    GpuUnavailableError,
    NullSampler,
    NvmlSampler,
    detect_local_gpus,
    open_sampler,
)

__all__ = [
    "GpuReading",
    "GpuSampler",
    "GpuUnavailableError",
    "NullSampler",
    "NvmlSampler",
    "detect_local_gpus",
    "open_sampler",
]
