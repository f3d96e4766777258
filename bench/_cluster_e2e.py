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
import shutil
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _wrk  # noqa: E402
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


def run(redis_url: str, redis_port: int, *, seconds: int, rounds: int) -> dict[str, Any]:
    """Medians over ``rounds`` of each target's saturated req/s and unloaded p50."""
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
        port = free_port()
        one = start("one", [*corral, str(_config(work / "one.toml", port, backends, None))])
        targets["1 process"] = [f"http://127.0.0.1:{port}"]
        port = free_port()
        cfg = _config(work / "workers.toml", port, backends, redis_url)
        workers = start("workers", [*corral, str(cfg), "--workers", "2"])
        targets["2 workers"] = [f"http://127.0.0.1:{port}"]
        replicas = []
        for number in range(2):
            port = free_port()
            cfg = _config(work / f"replica{number}.toml", port, backends, redis_url)
            replicas.append(start(f"replica{number}", [*corral, str(cfg)]))
            targets.setdefault("2 replicas", []).append(f"http://127.0.0.1:{port}")
        for name, proc in [("1 process", one), ("2 workers", workers)]:
            wait_until(lambda u=targets[name][0]: http("GET", f"{u}/readyz") == 200, proc, name)
        for url, proc in zip(targets["2 replicas"], replicas, strict=True):
            wait_until(lambda u=url: http("GET", f"{u}/readyz") == 200, proc, "replica")
        results: dict[str, dict[str, list[float]]] = {t: {} for t in targets}
        for number in range(rounds):
            print(f"end to end, round {number + 1}/{rounds} ...", file=sys.stderr, flush=True)
            for name, urls in targets.items():
                # warm-up, then the measured runs
                _wrk.run(wrk, work, urls, "/api/generate", BODY, threads=2, conns=8, seconds=1)
                before = redis_processed(redis_port), redis_commands(redis_port)
                sat = _wrk.run(wrk, work, urls, "/api/generate", BODY,
                               threads=2, conns=32, seconds=seconds)  # fmt: skip
                after = redis_processed(redis_port), redis_commands(redis_port)
                lone = _wrk.run(wrk, work, urls[:1], "/api/generate", BODY,
                                threads=1, conns=1, seconds=seconds)  # fmt: skip
                row = results[name]
                row.setdefault("rps", []).append(sat["rps"])
                row.setdefault("errors", []).append(sat["errors"] + lone["errors"])
                row.setdefault("p50_ms", []).append(lone["p50_ms"])
                if name.startswith("2 "):
                    served = max(1, sat["requests"])
                    scripts = sum(after[1].get(c, 0) - before[1].get(c, 0) for c in SCRIPTS)
                    row.setdefault("redis_per_req", []).append(scripts / served)
                    row.setdefault("commands_per_req", []).append((after[0] - before[0]) / served)
        return {
            name: {key: statistics.median(values) for key, values in row.items()}
            for name, row in results.items()
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


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
    lines.append(f"\n({cores} CPUs; every process on the same machine, wrk included)")
    return "\n".join(lines)
