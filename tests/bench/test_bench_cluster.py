"""bench/cluster.py's pure parts: the end-to-end table (CPU by role, the budgeted runs) and
the CPU budget's cgroup files. Nothing here is timed; the benchmark never runs in CI."""

from __future__ import annotations

from pathlib import Path

import _cgroup
import _cluster_e2e
import pytest

ROLES = ("corral", "backends", "wrk", "redis")


def row(rps: float, p50: float, corral_us: float, *, budget: float | None = None) -> dict:
    found = {"rps": rps, "p50_ms": p50, "errors": 0.0}
    for role, us in zip(ROLES, (corral_us, 20.0, 18.0, 1.0), strict=True):
        found[f"{role}_us"] = us
        found[f"{role}_cores"] = us * rps / 1e6
    if budget is not None:
        found |= {
            "budget_rps": budget,
            "budget_errors": 0.0,
            "budget_cores": 0.6,
            "budget_us": corral_us,
            "budget_throttled": 0.3,
        }
    return found


def test_the_table_gives_ratios_and_where_the_cores_went() -> None:
    """Ratios to one process in both runs (shared machine and budgeted), and the cores each
    role used, corral apart from the rest."""
    medians = {
        "direct": row(100_000, 0.05, 0.0),
        "1 process": row(9_000, 0.18, 110.0, budget=5_000),
        "2 workers": row(12_600, 0.181, 113.0, budget=9_500),
    }
    medians["2 workers"] |= {"redis_per_req": 0.01, "commands_per_req": 0.02}
    text = _cluster_e2e.table(medians, 2)
    assert "| 2 workers | 12,600 | 1.40 | 0.181 | 0.131 | 0.001 | 0.01 | 0.0 | 0 |" in text
    # 113 us at 12,600 req/s: 1.42 cores of corral; (20 + 18 + 1) us: 0.49 for the rest.
    assert "| 2 workers | 113 | 20 | 18 | 1 | 1.42 | 0.49 | 1.92 |" in text
    assert "| 2 workers | 9,500 | 1.90 | 0.60 | 113 | 30% | 0 |" in text
    assert "| direct |" in text.split("CPU budget")[0]
    assert "| direct |" not in text.split("CPU budget")[1]


def test_no_budget_rows_without_a_budgeted_run() -> None:
    medians = {"direct": row(100_000, 0.05, 0.0), "1 process": row(9_000, 0.18, 110.0)}
    assert "CPU budget" not in _cluster_e2e.table(medians, 2)


@pytest.mark.parametrize("version", [1, 2])
def test_a_budget_is_a_cfs_quota_on_a_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """1.2 cores is a quota of 1.2 periods, in v1's files or v2's cpu.max; the processes are
    moved in and back out; the throttled time is read from cpu.stat."""
    if version == 2:
        (tmp_path / "cgroup.subtree_control").write_text("cpu memory\n")
        monkeypatch.setattr(_cgroup, "V2", tmp_path)
        monkeypatch.setattr(_cgroup, "V1", tmp_path / "absent")
    else:
        (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
        monkeypatch.setattr(_cgroup, "V2", tmp_path / "absent")
        monkeypatch.setattr(_cgroup, "V1", tmp_path)
    (tmp_path / "cgroup.procs").write_text("")
    budget = _cgroup.Budget("bench", 1.2)
    group = tmp_path / "bench"
    if version == 2:
        assert (group / "cpu.max").read_text() == f"{round(1.2 * _cgroup.PERIOD_US)} 20000"
        (group / "cpu.stat").write_text("usage_usec 10\nthrottled_usec 2500000\n")
    else:
        assert (group / "cpu.cfs_period_us").read_text() == "20000"
        assert (group / "cpu.cfs_quota_us").read_text() == str(round(1.2 * _cgroup.PERIOD_US))
        (group / "cpu.stat").write_text("nr_periods 5\nthrottled_time 2500000000\n")
    budget.add(4242)  # no such process: only it is written, no children
    assert (group / "cgroup.procs").read_text() == "4242"
    assert budget.throttled_s() == pytest.approx(2.5)
    budget.close()
    assert (tmp_path / "cgroup.procs").read_text() == "4242"  # moved back out
