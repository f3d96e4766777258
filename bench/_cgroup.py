"""A CPU budget for a group of processes: a cgroup with a CFS quota (Linux, root).

bench/cluster.py uses it to give each corral process the same fixed share of a core, so that
the load generator and the backends, which share the machine, never eat into corral's CPU:
one process gets ``cores``, two workers twice that. That is how "N dedicated cores" looks
on a machine too small to dedicate them.

Works with cgroup v2 (``cpu.max``) and with v1's ``cpu`` controller
(``cpu.cfs_quota_us``); :func:`available` says whether either is writable here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

V2 = Path("/sys/fs/cgroup")
V1 = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 20_000  # short periods: a throttled process waits at most this long


def _root() -> tuple[Path, int] | None:
    """The writable cgroup root and its version, or None."""
    control = V2 / "cgroup.subtree_control"
    if control.exists() and "cpu" in control.read_text().split():
        return V2, 2
    if (V1 / "cpu.cfs_quota_us").exists():
        return V1, 1
    return None


def available() -> bool:
    """Whether a CPU budget can be set here (a cgroup can be made and given a quota)."""
    root = _root()
    if root is None or not os.access(root[0], os.W_OK):
        return False
    try:
        with Budget("corral-bench-probe", 0.5):
            return True
    except OSError:
        return False


class Budget:
    """A cgroup named ``name`` whose processes together get at most ``cores`` CPUs."""

    def __init__(self, name: str, cores: float) -> None:
        root = _root()
        if root is None:
            raise OSError("no writable cgroup cpu controller")
        self.path, self.version = root[0] / name, root[1]
        self.cores = cores
        self.path.mkdir(exist_ok=True)
        quota = max(1000, round(cores * PERIOD_US))
        if self.version == 2:
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pid: int) -> None:
        """Move ``pid`` (all its threads) and its live children into the budget."""
        pids = [pid]
        with contextlib.suppress(OSError):
            pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        for p in pids:
            (self.path / "cgroup.procs").write_text(str(p))

    def throttled_s(self) -> float:
        """Seconds the group has been held back by its quota so far."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_usec":
                return int(value) / 1e6
            if key == "throttled_time":  # v1: nanoseconds
                return int(value) / 1e9
        return 0.0

    def close(self) -> None:
        """Move the processes back to the parent group and remove the cgroup."""
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.path.parent / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def __enter__(self) -> Budget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
