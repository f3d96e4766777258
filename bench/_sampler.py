"""Resident memory and CPU of a process, and how busy the machine is, over time: read from
/proc (Linux) by a background thread, so that sampling does not wait on any event loop."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _cpu import cpu_seconds

MB = 1_000_000


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes; 0 when unknown (no /proc, or the process is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return 0


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot; (0, 0) without /proc."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    return 0, 0


def cpu_pressure_us() -> int:
    """Microseconds, since boot, in which some runnable task waited for a CPU (PSI); 0 when
    the kernel does not say (no /proc/pressure)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
        return int(some.rsplit("total=", 1)[1])
    return 0


@dataclass(frozen=True)
class Sample:
    """One reading: seconds since the sampler's zero; the process's RSS bytes and cumulative
    CPU seconds; the machine's busy and total jiffies and its CPU pressure (µs)."""

    t_s: float
    rss_bytes: int
    cpu_s: float
    busy_j: int = 0
    total_j: int = 0
    pressure_us: int = 0


class Sampler:
    """Samples one process every ``interval_s`` until stopped; ``t_s`` counts from ``t0``
    (a ``time.monotonic()`` value shared with whoever marks the phases)."""

    def __init__(self, pid: int, interval_s: float, t0: float | None = None) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            self.sample()
            next_at += self.interval_s
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return

    def sample(self) -> Sample:
        t = time.monotonic() - self.t0
        busy, total = machine_jiffies()
        s = Sample(t, rss_bytes(self.pid), cpu_seconds(self.pid), busy, total, cpu_pressure_us())
        self.samples.append(s)
        return s

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(5)
        return list(self.samples)


def between(samples: list[Sample], start_s: float, end_s: float) -> list[Sample]:
    """The samples taken in [start_s, end_s]."""
    return [s for s in samples if start_s <= s.t_s <= end_s]


def cpu_share(samples: list[Sample]) -> float:
    """CPU seconds per wall second over the samples (1.0: one core busy); NaN if < 2."""
    if len(samples) < 2 or samples[-1].t_s <= samples[0].t_s:
        return float("nan")
    return (samples[-1].cpu_s - samples[0].cpu_s) / (samples[-1].t_s - samples[0].t_s)


def machine_busy(samples: list[Sample]) -> float:
    """Share of all the machine's CPUs busy over the samples; NaN if unknown."""
    if len(samples) < 2 or samples[-1].total_j <= samples[0].total_j:
        return float("nan")
    first, last = samples[0], samples[-1]
    return (last.busy_j - first.busy_j) / (last.total_j - first.total_j)


def cpu_pressure(samples: list[Sample]) -> float:
    """Share of the time over the samples in which some runnable task waited for a CPU (1.0:
    always someone waiting: the machine is oversubscribed); NaN if unknown."""
    if len(samples) < 2 or not samples[-1].pressure_us:
        return float("nan")
    first, last = samples[0], samples[-1]
    return (last.pressure_us - first.pressure_us) / 1e6 / (last.t_s - first.t_s)


def peak_rss(samples: list[Sample]) -> int:
    """The largest RSS among the samples (0 when there are none)."""
    return max((s.rss_bytes for s in samples), default=0)
