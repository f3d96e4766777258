"""This host's real GPUs through NVML: runs where an NVIDIA driver is present, skips elsewhere."""

from __future__ import annotations

import pytest

from corral.fleet.gpu import NvmlSampler, detect_local_gpus

GPUS, REASON = detect_local_gpus()
pytestmark = pytest.mark.skipif(not GPUS, reason=f"no NVIDIA GPU here: {REASON}")


def test_every_gpu_reads_plausible_values() -> None:
    """Name, UUID, memory, utilization, temperature and power are in range for a real GPU."""
    sampler = NvmlSampler()
    try:
        readings = sampler.sample()
    finally:
        sampler.close()
    assert [r.index for r in readings] == list(range(len(readings)))
    for r in readings:
        assert r.name
        assert r.uuid.startswith(("GPU-", "MIG-"))
        assert r.memory_total_bytes is not None
        assert r.memory_total_bytes > 1024**3
        assert r.memory_used_bytes is not None
        assert 0 <= r.memory_used_bytes <= r.memory_total_bytes
        assert r.utilization_ratio is not None
        assert 0 <= r.utilization_ratio <= 1
        assert r.temperature_c is not None
        assert 10 < r.temperature_c < 110
        if r.power_w is not None:
            assert 0 < r.power_w < 2000
        assert sampler.driver
