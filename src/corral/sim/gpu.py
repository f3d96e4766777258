"""The simulator's one GPU, shown the way NVIDIA's dcgm-exporter shows a GPU: ``GET /_sim/dcgm``.

The page follows dcgm-exporter 4.5 with its default counters file, outside Kubernetes: per
field a ``# HELP`` and a ``# TYPE`` line, then the sample, labelled ``gpu``, ``UUID``,
``pci_bus_id``, ``device``, ``modelName``, ``Hostname`` (the sim's name) and
``DCGM_FI_DRIVER_VERSION``, in that order; fields in DCGM field-id order; integer fields as
integers, double fields with six decimals (Go's ``%f``). One field beyond the defaults,
``DCGM_FI_DEV_POWER_MGMT_LIMIT``, carries ``power_limit_w`` (an exporter shows it when its
counters file lists it). ``DCGM_FI_DEV_XID_ERRORS`` is absent, as on a GPU that never had an
XID error, and so is NVLink: the simulated GPU is a PCIe card.

The figures are computed from the scheduler when the page is read, never per request:

- memory used = the runners' VRAM + ``BASE_USED_MIB``, free = ``vram_bytes`` - used (MiB);
- utilization = 0 with no parallel slot taken, else ``BUSY_UTIL_PCT`` rising to
  ``MAX_UTIL_PCT`` as the taken slots reach ``num_parallel``; ``gpu_util_pct`` overrides;
- temperature = ``IDLE_TEMP_C`` + ``TEMP_RISE_C`` x utilization; ``gpu_temp_c`` overrides;
- power = ``IDLE_POWER_W`` rising linearly with utilization to ``power_limit_w``; the energy
  counter adds up power over the time between reads.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

from corral.sim.config import SimConfig
from corral.sim.core import Sim

MIB = 1024**2
BASE_USED_MIB = 512  # what an idle GPU shows in use (driver context, CUDA runtime)
BUSY_UTIL_PCT = 85.0
MAX_UTIL_PCT = 99.0
IDLE_TEMP_C = 35.0
TEMP_RISE_C = 45.0
IDLE_POWER_W = 70.0
DRIVER_VERSION = "570.172.08"
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# (field, Prometheus type, help) in DCGM field-id order, help texts as dcgm-exporter has them.
_FIELDS = (
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C)."),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
    ),
    ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "gauge", "Current power limit for the device (in W)."),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries."),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %)."),
    ("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %)."),
    ("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %)."),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB)."),
    (
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for uncorrectable errors",
    ),
    (
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for correctable errors",
    ),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed"),
    ("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge", "vGPU License status"),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active."),
    (
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "gauge",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
    ),
    (
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
    ),
    (
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and "
        "data payloads - in bytes per second.",
    ),
    (
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and "
        "data payloads - in bytes per second.",
    ),
)


@dataclass(frozen=True)
class GpuState:
    """The simulated GPU at one moment, in dcgm-exporter's units (MiB, %, °C, W)."""

    total_mib: int
    used_mib: int
    util_pct: float
    temp_c: float
    power_w: float
    power_limit_w: float

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib


def gpu_state(sim: Sim) -> GpuState:
    """What the GPU shows now, from the scheduler's runners and slots and the live config."""
    config = sim.config
    sched = sim.scheduler
    total = config.vram_bytes // MIB
    used = min(total, BASE_USED_MIB + sched.vram_in_use() // MIB)
    util = config.gpu_util_pct
    if util is None:
        busy = sched.busy_slots()
        share = min(1.0, busy / max(1, config.num_parallel))
        util = round(BUSY_UTIL_PCT + (MAX_UTIL_PCT - BUSY_UTIL_PCT) * share) if busy else 0.0
    temp = config.gpu_temp_c
    if temp is None:
        temp = round(IDLE_TEMP_C + TEMP_RISE_C * util / 100)
    limit = config.power_limit_w
    idle = min(IDLE_POWER_W, limit)
    power = idle + (limit - idle) * util / 100
    return GpuState(total, used, util, temp, power, limit)


class _EnergyMeter:
    """Energy (mJ) summed over reads: the power read now times the time since the last read."""

    __slots__ = ("at", "mj")

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.mj = 0.0

    def add(self, power_w: float) -> int:
        now = time.monotonic()
        self.mj += power_w * (now - self.at) * 1000
        self.at = now
        return int(self.mj)


_meters: weakref.WeakKeyDictionary[Sim, _EnergyMeter] = weakref.WeakKeyDictionary()


def _int(value: float) -> str:
    """An integer field as Go's ``%d`` writes it (an override with a fraction keeps it)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(config: SimConfig) -> str:
    """The label set dcgm-exporter puts on each sample of this GPU, in its order."""
    index = config.gpu_index
    pairs = (
        ("gpu", str(index)),
        ("UUID", config.reported_gpu_uuid),
        ("pci_bus_id", f"00000000:{(0x18 + 0x10 * index) % 0x100:02X}:00.0"),
        ("device", f"nvidia{index}"),
        ("modelName", config.reported_gpu_name),
        ("Hostname", config.name),
        ("DCGM_FI_DRIVER_VERSION", DRIVER_VERSION),
    )
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)


def render_dcgm(sim: Sim) -> str:
    """The ``/metrics`` page of a dcgm-exporter watching this simulator's one GPU."""
    state = gpu_state(sim)
    meter = _meters.get(sim)
    if meter is None:
        meter = _meters[sim] = _EnergyMeter()
    busy = state.util_pct > 0
    util = state.util_pct
    mem_copy = round(util * 0.6)
    values = {
        "DCGM_FI_DEV_SM_CLOCK": _int(1980 if busy else 345),
        "DCGM_FI_DEV_MEM_CLOCK": _int(2619 if busy else 405),
        "DCGM_FI_DEV_MEMORY_TEMP": _int(round(state.temp_c) + 3),
        "DCGM_FI_DEV_GPU_TEMP": _int(state.temp_c),
        "DCGM_FI_DEV_POWER_USAGE": f"{state.power_w:f}",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": _int(meter.add(state.power_w)),
        "DCGM_FI_DEV_POWER_MGMT_LIMIT": f"{state.power_limit_w:f}",
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": "0",
        "DCGM_FI_DEV_GPU_UTIL": _int(util),
        "DCGM_FI_DEV_MEM_COPY_UTIL": _int(mem_copy),
        "DCGM_FI_DEV_ENC_UTIL": "0",
        "DCGM_FI_DEV_DEC_UTIL": "0",
        "DCGM_FI_DEV_FB_FREE": _int(state.free_mib),
        "DCGM_FI_DEV_FB_USED": _int(state.used_mib),
        "DCGM_FI_DEV_FB_RESERVED": "0",
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": "0",
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": "0",
        "DCGM_FI_DEV_ROW_REMAP_FAILURE": "0",
        "DCGM_FI_DEV_VGPU_LICENSE_STATUS": "0",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": f"{util * 0.0095:f}",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": f"{util * 0.003:f}",
        "DCGM_FI_PROF_DRAM_ACTIVE": f"{mem_copy / 100:f}",
        "DCGM_FI_PROF_PCIE_TX_BYTES": _int(2_400_000 if busy else 110_000),
        "DCGM_FI_PROF_PCIE_RX_BYTES": _int(1_200_000 if busy else 17_000),
    }
    label_text = labels(sim.config)
    lines: list[str] = []
    for name, kind, help_text in _FIELDS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{{{label_text}}} {values[name]}")
    lines.append("")
    return "\n".join(lines)
