"""bench: what sharing slots through Redis costs (a first version: the cluster library alone).

Starts a redis-server on a free loopback port (or uses ``--redis-url``), then measures, in one
run and over ``--rounds`` rounds (medians printed):

- ping: one coroutine, back-to-back ``PING``: p50 of one Redis round trip (the floor);
- unloaded: one replica, one coroutine, back-to-back acquire + release: p50 of acquire and of
  the pair (the latency Redis adds to a request), and round trips per request, counted by
  the client (no background loop runs in this phase);
- saturated, 1 then 2 replica processes: ``--concurrency`` coroutines each doing acquire +
  release: pairs/s (summed), p50 of a pair, and scripts Redis ran per pair (its own
  ``INFO commandstats``, background heartbeats included). A replica reuses the units it
  holds, so these are nearly free of Redis once the units are granted;
- contended: 2 replica processes on one backend of 8 slots, each request holding its slot
  1 ms (a denied one waits for a unit to free, as a queued request does): pairs/s (at most
  8,000), the smaller replica's share (0.5 is fair) and the scripts and commands Redis ran
  per pair, as units move between the replicas.

Each replica is its own process (``--worker``), running the cluster's background loop
(heartbeat, pub/sub listener, leader lock), on uvloop when installed, as corral would.

Then, end to end (bench/_cluster_e2e.py, skipped with ``--no-e2e``): corral processes in front
of two fast backends (bench/_fast_backend.py), driven by wrk: req/s and added p50 for 1
process, ``serve --workers 2`` and 2 replicas sharing the Redis, and the Redis commands per
request.

    .venv/bin/python bench/cluster.py            # 3 rounds of 3 s phases, about 40 s
    .venv/bin/python bench/cluster.py --quick    # 1 round of 1 s phases
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000 if samples else float("nan")


# One replica (a subprocess) -----------------------------------------------------------------


async def worker(spec: dict[str, Any]) -> dict[str, Any]:
    from pydantic import SecretStr

    from corral.cluster import Cluster
    from corral.config import ClusterSettings

    settings = ClusterSettings.model_construct(
        redis_url=SecretStr(spec["url"]), name="bench", lease_s=10.0
    )
    cluster = Cluster(settings)
    assert await cluster.connect(), "Redis did not answer"
    phase, duration_s = spec["phase"], spec["duration_s"]
    result: dict[str, Any] = {}
    if phase == "ping":
        samples = []
        deadline = time.perf_counter() + duration_s
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await cluster.link.run(cluster.link.redis.ping())
            samples.append(time.perf_counter() - started)
        result = {"ping_p50_ms": p50_ms(samples)}
    elif phase == "unloaded":  # no background loop: every Redis call counted is the request's
        acquire, pair = [], []
        calls = pairs = 0
        deadline = time.perf_counter() + duration_s
        while time.perf_counter() < deadline:
            before = cluster.link.calls
            started = time.perf_counter()
            lease = await cluster.acquire("gpu0", 1_000_000)
            granted = time.perf_counter()
            assert lease is not None
            await cluster.release(lease)
            done = time.perf_counter()
            acquire.append(granted - started)
            pair.append(done - started)
            calls += cluster.link.calls - before
            pairs += 1
        result = {
            "acquire_p50_ms": p50_ms(acquire),
            "pair_p50_ms": p50_ms(pair),
            "round_trips": calls / pairs,
        }
    else:  # saturated (a backend each, no limit) or contended (one backend, a small limit)
        runner = asyncio.create_task(cluster.run())
        pair = []
        stop = time.perf_counter() + duration_s
        contended = phase in ("contended", "urgent")
        priority = float(spec.get("priority", 1.0))  # urgent: 2.0 (a more urgent class)
        backend = "shared" if contended else f"gpu{spec['index']}"
        limit = spec["limit"] if contended else 1_000_000
        changed = asyncio.Event()  # a unit freed here or elsewhere: a denied client retries
        cluster.on_freed(lambda _backend: changed.set())

        async def client() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                lease = await cluster.acquire(backend, limit, want=2, priority=priority)
                while lease is None:  # as a queued request: wait for a unit to free
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 0.005)
                    if time.perf_counter() >= stop:
                        return
                    lease = await cluster.acquire(backend, limit, want=2, priority=priority)
                if contended:
                    await asyncio.sleep(0.001)  # the backend serves for a millisecond
                await cluster.release(lease)
                changed.set()
                pair.append(time.perf_counter() - started)

        if contended:
            cluster.publish_urgency(priority)

        # Start together with the other replicas: at a wall-clock instant.
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        stop = time.perf_counter() + duration_s
        await asyncio.gather(*(client() for _ in range(spec["concurrency"])))
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        result = {"pairs": len(pair), "pair_p50_ms": p50_ms(pair), "up": cluster.up}
    await cluster.close()
    return result


def run_worker(arg: str) -> None:
    spec = json.loads(arg)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(worker(spec))), flush=True)


# The conductor ------------------------------------------------------------------------------


def spawn(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def collect(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"a replica failed (exit {proc.returncode})"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def redis_commands(port: int) -> dict[str, int]:
    """``INFO commandstats`` calls per command (a raw RESP exchange)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            data += chunk
            if not chunk or (data.count(b"\r\n") >= 2 and data.endswith(b"\r\n\r\n")):
                break
            if data.startswith(b"$"):
                size = int(data[1 : data.index(b"\r\n")])
                if len(data) >= data.index(b"\r\n") + 2 + size:
                    break
    counts: dict[str, int] = {}
    for line in data.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            calls = dict(f.split("=") for f in fields.split(","))["calls"]
            counts[name.removeprefix("cmdstat_")] = int(calls)
    return counts


def one_round(url: str, port: int | None, args: argparse.Namespace) -> dict[str, float]:
    row: dict[str, float] = {}
    base = {"url": url, "duration_s": args.duration, "concurrency": args.concurrency}
    row.update(collect(spawn({**base, "phase": "ping", "index": 0})))
    row.update(collect(spawn({**base, "phase": "unloaded", "index": 0})))
    for replicas in (1, 2):
        before = redis_commands(port) if port else {}
        start_at = time.time() + 1.5  # after every replica joined
        procs = [
            spawn({**base, "phase": "saturated", "index": i, "start_at": start_at})
            for i in range(replicas)
        ]
        results = [collect(p) for p in procs]
        after = redis_commands(port) if port else {}
        pairs = sum(r["pairs"] for r in results)
        row[f"x{replicas}_pairs_per_s"] = pairs / args.duration
        row[f"x{replicas}_pair_p50_ms"] = statistics.median(r["pair_p50_ms"] for r in results)
        if port:
            scripts = sum(after.get(c, 0) - before.get(c, 0) for c in ("evalsha", "eval"))
            row[f"x{replicas}_scripts_per_pair"] = scripts / pairs
    # Contended: 2 replicas, one backend of CONTENDED_LIMIT slots, each request holding its
    # slot 1 ms: units must move between the replicas.
    before = redis_commands(port) if port else {}
    start_at = time.time() + 1.5
    spec = {**base, "phase": "contended", "limit": CONTENDED_LIMIT, "start_at": start_at}
    results = [collect(p) for p in [spawn({**spec, "index": i}) for i in range(2)]]
    after = redis_commands(port) if port else {}
    pairs = sum(r["pairs"] for r in results)
    row["c2_pairs_per_s"] = pairs / args.duration
    row["c2_share"] = min(r["pairs"] for r in results) / max(1, pairs)
    if port:
        used = sum(after.get(c, 0) - before.get(c, 0) for c in after if c != "info")
        scripts = sum(after.get(c, 0) - before.get(c, 0) for c in ("evalsha", "eval"))
        row["c2_scripts_per_pair"] = scripts / max(1, pairs)
        row["c2_commands_per_pair"] = used / max(1, pairs)
    # Urgent: the same, but one replica's requests are of a more urgent class (priority 2
    # against 1): its share of the units, and each replica's p50 (wait + the 1 ms held).
    start_at = time.time() + 1.5
    spec = {**base, "phase": "urgent", "limit": CONTENDED_LIMIT, "start_at": start_at}
    procs = [spawn({**spec, "index": i, "priority": 2.0 - i}) for i in range(2)]
    urgent, normal = (collect(p) for p in procs)
    pairs = urgent["pairs"] + normal["pairs"]
    row["u2_pairs_per_s"] = pairs / args.duration
    row["u2_urgent_share"] = urgent["pairs"] / max(1, pairs)
    row["u2_urgent_p50_ms"] = urgent["pair_p50_ms"]
    row["u2_normal_p50_ms"] = normal["pair_p50_ms"]
    return row


CONTENDED_LIMIT = 8


ROWS = [
    ("ping_p50_ms", "one Redis round trip (PING), p50 ms"),
    ("acquire_p50_ms", "acquire, p50 ms (unloaded)"),
    ("pair_p50_ms", "acquire + release, p50 ms (unloaded)"),
    ("round_trips", "Redis round trips per request (client-counted)"),
    ("x1_pairs_per_s", "1 replica: acquire + release pairs/s"),
    ("x1_pair_p50_ms", "1 replica: pair p50 ms under load"),
    ("x1_scripts_per_pair", "1 replica: scripts run per pair (server-counted)"),
    ("x2_pairs_per_s", "2 replicas: pairs/s, summed"),
    ("x2_pair_p50_ms", "2 replicas: pair p50 ms under load"),
    ("x2_scripts_per_pair", "2 replicas: scripts run per pair (server-counted)"),
    ("c2_pairs_per_s", f"contended (2 replicas, limit {CONTENDED_LIMIT}, 1 ms each): pairs/s"),
    ("c2_share", "contended: the smaller replica's share of the pairs"),
    ("c2_scripts_per_pair", "contended: scripts run per pair (server-counted)"),
    ("c2_commands_per_pair", "contended: Redis commands per pair (server-counted)"),
    ("u2_pairs_per_s", "urgent (the same, one replica's class more urgent): pairs/s"),
    ("u2_urgent_share", "urgent: the more urgent replica's share of the pairs"),
    ("u2_urgent_p50_ms", "urgent: the more urgent replica's pair p50 ms"),
    ("u2_normal_p50_ms", "urgent: the other replica's pair p50 ms"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help="use this Redis (default: start redis-server)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=32, help="coroutines per replica")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s phases")
    parser.add_argument("--no-e2e", action="store_true", help="the library phases only")
    parser.add_argument("--no-library", action="store_true", help="the end-to-end phase only")
    parser.add_argument("--e2e-seconds", type=int, default=5, help="seconds per wrk run")
    parser.add_argument(
        "--core-budget",
        type=float,
        default=0.6,
        help="end to end, again with each corral process held to this many cores by a cgroup "
        "quota (root; 0: skip)",
    )
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    if args.quick:
        args.rounds, args.duration = 1, 1.0
    server = None
    port: int | None = None
    url = args.redis_url
    if url is None:
        executable = shutil.which("redis-server")
        if executable is None:
            sys.exit("redis-server is not installed (sh scripts/test-deps.sh installs it)")
        port = free_port()
        server = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--logfile", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_commands(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
    e2e: dict[str, Any] | None = None
    try:
        rounds = []
        for number in range(0 if args.no_library else args.rounds):
            print(f"round {number + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            rounds.append(one_round(url, port, args))
        if not args.no_e2e and port is not None:
            import _cgroup
            import _cluster_e2e

            seconds = 2 if args.quick else args.e2e_seconds
            assert server is not None
            budget = args.core_budget
            if budget > 0 and not _cgroup.available():
                print("no writable cgroup cpu controller: the CPU-budget runs are skipped",
                      file=sys.stderr)  # fmt: skip
                budget = 0.0
            e2e = _cluster_e2e.run(
                url, port, server.pid, seconds=seconds, rounds=args.rounds, budget=budget
            )
    finally:
        if server is not None:
            server.terminate()
            server.wait(5)
    cores = os.cpu_count()
    print(f"\ncorral cluster slots on loopback Redis: median of {args.rounds} round(s), "
          f"{args.duration:g} s phases, {args.concurrency} coroutines per replica, "
          f"{cores} CPUs")  # fmt: skip
    width = max(len(label) for _, label in ROWS)
    print(f"| {'measure':<{width}} | {'median':>10} |")
    print(f"| {'-' * width} | {'-' * 10}:|")
    for key, label in ROWS:
        values = [r[key] for r in rounds if key in r]
        if values:
            print(f"| {label:<{width}} | {statistics.median(values):>10.3f} |")
    if e2e is not None:
        import _cluster_e2e

        print(f"\nend to end: corral in front of two fast backends, median of {args.rounds} "
              f"round(s)")  # fmt: skip
        print(_cluster_e2e.table(e2e, cores))


if __name__ == "__main__":
    main()
