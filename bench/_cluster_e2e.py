"""bench/cluster.py, end to end: corral processes in front of two fast backends, driven by wrk.

Targets, each measured in the same run against the same backends and Redis:
``direct`` (wrk to the first backend: the floor), ``1 process`` (corral without [cluster]),
``2 workers`` (``corral serve --workers 2`` sharing slots through Redis, one port), and
``2 replicas`` (two ``corral serve`` processes with the same Redis, wrk's threads spread over
both ports). Saturated: ``wrk -t2 -c32``, req/s; unloaded: ``wrk -t1 -c1``, p50 (its added p50
is the target's minus direct's). Redis round trips per request: the scripts Redis ran (its
``INFO commandstats`` EVALSHA and EVAL calls, background heartbeats and leader renewals
included) over the requests served; and all the commands it ran (those inside the scripts
too: ZADD, PUBLISH, TIME...) per request.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _cgroup  # noqa: E402
import _wrk  # noqa: E402
from _cpu import total_cpu  # noqa: E402
from _procs import Proc, free_port, http, wait_until  # noqa: E402

from cluster import redis_commands  # noqa: E402

SCRIPTS = ("evalsha", "eval")
BODY = '{"model":"llama3.2","prompt":"hi","stream":false}'


def redis_processed(port: int) -> int:
    """``total_commands_processed`` from ``INFO stats`` (a raw RESP exchange)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO stats\r\n")
        data = b""
        while b"total_commands_processed:" not in data or not data.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    raise RuntimeError("no total_commands_processed in INFO stats")


def _config(path: Path, port: int, backends: list[str], redis_url: str | None) -> Path:
    lines = [
        f'[server]\nport = {port}\nlog_level = "warning"\n',
        "[health]\ninterval_s = 2\n",
    ]
    if redis_url:
        lines.append(f'[cluster]\nredis_url = "{redis_url}"\nname = "bench-e2e"\n')
    for number, url in enumerate(backends):
        lines.append(f'[[backends]]\nid = "b{number}"\nurl = "{url}"\nmax_concurrent = 64\n')
    path.write_text("".join(lines))
    return path


def run(
    redis_url: str,
    redis_port: int,
    redis_pid: int,
    *,
    seconds: int,
    rounds: int,
    budget: float = 0.0,
) -> dict[str, Any]:
    """Medians over ``rounds`` of each target's saturated req/s and unloaded p50; with a
    ``budget`` (cores per corral process, where a cgroup can hold it), each target's saturated
    req/s again with its corral processes held to that budget (``budget_*`` keys)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="corral-cluster-e2e-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    procs: list[Proc] = []

    def start(name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, work / f"{name}.log", env=env).start()
        procs.append(proc)
        return proc

    try:
        backends = []
        for number in range(2):
            port = free_port()
            proc = start(f"backend{number}", [sys.executable, str(BENCH / "_fast_backend.py"),
                                              "--port", str(port)])  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda url=url: http("GET", f"{url}/api/version") == 200, proc, "backend")
            backends.append(url)
        corral = [sys.executable, "-m", "corral", "serve", "--config"]
        targets: dict[str, list[str]] = {"direct": [backends[0]]}
        backend_pids = [p.pid for p in procs]
        target_pids: dict[str, list[int]] = {"direct": []}
        port = free_port()
        one = start("one", [*corral, str(_config(work / "one.toml", port, backends, None))])
        targets["1 process"] = [f"http://127.0.0.1:{port}"]
        target_pids["1 process"] = [one.pid]
        port = free_port()
        cfg = _config(work / "workers.toml", port, backends, redis_url)
        workers = start("workers", [*corral, str(cfg), "--workers", "2"])
        targets["2 workers"] = [f"http://127.0.0.1:{port}"]
        target_pids["2 workers"] = [workers.pid]
        replicas = []
        for number in range(2):
            port = free_port()
            cfg = _config(work / f"replica{number}.toml", port, backends, redis_url)
            replicas.append(start(f"replica{number}", [*corral, str(cfg)]))
            targets.setdefault("2 replicas", []).append(f"http://127.0.0.1:{port}")
            target_pids.setdefault("2 replicas", []).append(replicas[-1].pid)
        for name, proc in [("1 process", one), ("2 workers", workers)]:
            wait_until(lambda u=targets[name][0]: http("GET", f"{u}/readyz") == 200, proc, name)
        for url, proc in zip(targets["2 replicas"], replicas, strict=True):
            wait_until(lambda u=url: http("GET", f"{u}/readyz") == 200, proc, "replica")
        results: dict[str, dict[str, list[float]]] = {t: {} for t in targets}

        def budgeted(name: str, urls: list[str], pids: list[int], row: dict[str, Any]) -> None:
            """The saturated run again, ``name``'s corral processes held to ``budget`` cores
            each (a supervisor counts for nothing: its workers are the processes)."""
            processes = 2 if name.startswith("2 ") else 1
            slug = name.replace(" ", "-")
            with _cgroup.Budget(f"corral-bench-{slug}", budget * processes) as group:
                for pid in pids:
                    group.add(pid)
                _wrk.run(wrk, work, urls, "/api/generate", BODY, threads=2, conns=8, seconds=1)
                held = group.throttled_s()
                cpu_before = _cpu_by_role(pids, backend_pids, redis_pid)
                sat = _wrk.run(wrk, work, urls, "/api/generate", BODY,
                               threads=2, conns=32, seconds=seconds)  # fmt: skip
                cpu_after = _cpu_by_role(pids, backend_pids, redis_pid)
                row.setdefault("budget_rps", []).append(sat["rps"])
                row.setdefault("budget_errors", []).append(sat["errors"])
                used = cpu_after["corral"] - cpu_before["corral"]
                row.setdefault("budget_cores", []).append(used / seconds)
                row.setdefault("budget_us", []).append(used / max(1, sat["requests"]) * 1e6)
                row.setdefault("budget_throttled", []).append(
                    (group.throttled_s() - held) / seconds
                )

        for number in range(rounds):
            print(f"end to end, round {number + 1}/{rounds} ...", file=sys.stderr, flush=True)
            for name, urls in targets.items():
                # warm-up, then the measured runs
                _wrk.run(wrk, work, urls, "/api/generate", BODY, threads=2, conns=8, seconds=1)
                before = redis_processed(redis_port), redis_commands(redis_port)
                cpu_before = _cpu_by_role(target_pids[name], backend_pids, redis_pid)
                sat = _wrk.run(wrk, work, urls, "/api/generate", BODY,
                               threads=2, conns=32, seconds=seconds)  # fmt: skip
                cpu_after = _cpu_by_role(target_pids[name], backend_pids, redis_pid)
                after = redis_processed(redis_port), redis_commands(redis_port)
                lone = _wrk.run(wrk, work, urls[:1], "/api/generate", BODY,
                                threads=1, conns=1, seconds=seconds)  # fmt: skip
                row = results[name]
                row.setdefault("rps", []).append(sat["rps"])
                row.setdefault("errors", []).append(sat["errors"] + lone["errors"])
                row.setdefault("p50_ms", []).append(lone["p50_ms"])
                served = max(1, sat["requests"])
                for role, spent in cpu_after.items():
                    used = spent - cpu_before[role]
                    row.setdefault(f"{role}_us", []).append(used / served * 1e6)
                    row.setdefault(f"{role}_cores", []).append(used / seconds)
                if name.startswith("2 "):
                    scripts = sum(after[1].get(c, 0) - before[1].get(c, 0) for c in SCRIPTS)
                    row.setdefault("redis_per_req", []).append(scripts / served)
                    row.setdefault("commands_per_req", []).append((after[0] - before[0]) / served)
            if budget > 0:
                for name, urls in targets.items():
                    if name != "direct":
                        budgeted(name, urls, target_pids[name], results[name])
        return {
            name: {key: statistics.median(values) for key, values in row.items()}
            for name, row in results.items()
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def _cpu_by_role(target: list[int], backends: list[int], redis: int) -> dict[str, float]:
    """CPU seconds so far of the target's processes (a supervisor's workers included), the
    backends, wrk (finished children of this process: only wrk is reaped while running) and
    redis-server."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "corral": total_cpu(target),
        "backends": total_cpu(backends),
        "wrk": children.ru_utime + children.ru_stime,
        "redis": total_cpu([redis]),
    }


def table(medians: dict[str, Any], cores: int | None) -> str:
    direct = medians["direct"]["p50_ms"]
    one = medians["1 process"]
    lines = [
        "| target | req/s (wrk -t2 -c32) | × 1 process | p50 ms (-c1) | added p50 ms "
        "| added by Redis ms | Redis round trips/req | Redis commands/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in medians.items():
        ratio = row["rps"] / one["rps"] if one["rps"] else float("nan")
        added = row["p50_ms"] - direct if name != "direct" else 0.0
        redis_added = row["p50_ms"] - one["p50_ms"] if name.startswith("2 ") else None
        per_req = row.get("redis_per_req")
        commands = row.get("commands_per_req")
        lines.append(
            f"| {name} | {row['rps']:,.0f} | {ratio:.2f} | {row['p50_ms']:.3f} | {added:.3f} | "
            f"{'' if redis_added is None else f'{redis_added:.3f}'} | "
            f"{'' if per_req is None else f'{per_req:.2f}'} | "
            f"{'' if commands is None else f'{commands:.1f}'} | {row['errors']:.0f} |"
        )
    lines += [
        "",
        "Where the CPU went in the saturated runs: µs of CPU per request and cores in use, by role",
        "",
        "| target | corral µs/req | backends µs/req | wrk µs/req | redis µs/req "
        "| corral cores | other cores | all cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    roles = ("corral", "backends", "wrk", "redis")
    for name, row in medians.items():
        other = sum(row[f"{r}_cores"] for r in roles[1:])
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row[f'{r}_us']:.0f}" for r in roles)
            + f" | {row['corral_cores']:.2f} | {other:.2f} | {row['corral_cores'] + other:.2f} |"
        )
    budget = [(name, row) for name, row in medians.items() if "budget_rps" in row]
    if budget:
        base = medians["1 process"]["budget_rps"]
        lines += [
            "",
            "Each corral process held to the same CPU budget (a cgroup quota), so that wrk and "
            "the backends never take corral's share: N dedicated cores, scaled down",
            "",
            "| target | req/s (wrk -t2 -c32) | × 1 process | corral cores used "
            "| corral µs/req | time throttled | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in budget:
            lines.append(
                f"| {name} | {row['budget_rps']:,.0f} | {row['budget_rps'] / base:.2f} | "
                f"{row['budget_cores']:.2f} | {row['budget_us']:.0f} | "
                f"{row['budget_throttled']:.0%} | {row['budget_errors']:.0f} |"
            )
    lines.append(f"\n({cores} CPUs; every process on the same machine, wrk included)")
    return "\n".join(lines)
