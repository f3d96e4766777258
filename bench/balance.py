"""How well does corral balance unequal GPUs? Every strategy, with and without the central queue.

Two simulated Ollama backends (``python -m corral.sim``) with the same number of parallel
slots, one ``--slowdown`` times (2.5x) slower per request than the other, behind corral. An
open-loop client (aiohttp, one task per request) replays the same bursty arrival schedule
(bench/_balance_arrivals.py: on/off modulated Poisson, fixed seed) against every
configuration: the six strategies x {central queue, direct}.

- "queue": each backend's ``max_concurrent`` equals the simulator's slots, so excess requests
  wait in corral's queue and go to whichever backend frees a slot first (late binding).
- "direct": ``max_concurrent`` is large (``--direct-max-concurrent``), so corral places every
  request at once and it waits inside the chosen simulator's own queue, as with plain Ollama.

The ideal throughput is the sum of the backends' capacities (slots ÷ service time), with each
service time measured on its simulator alone, one request at a time, before the runs. A fresh
corral serves every configuration (no state, such as equal_weighted's lifetime counts or the
response-time EWMAs, carries from one to the next); the simulators stay up throughout.

    .venv/bin/python bench/balance.py            # 12 configurations x 25 s, about 6 minutes
    .venv/bin/python bench/balance.py --quick    # 12 x 8 s, about 2.5 minutes
    .venv/bin/python bench/balance.py --help

Prints a table and the same as markdown; writes bench/results/balance.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import aiohttp  # noqa: E402
from _balance_arrivals import Schedule, bursty_schedule  # noqa: E402
from _balance_model import central_fifo  # noqa: E402
from _balance_report import (  # noqa: E402
    Outcome,
    capacity,
    key,
    markdown,
    print_table,
    summarize,
    verdicts,
)
from _cpu import total_cpu  # noqa: E402
from _procs import Proc, free_port, http, log, wait_until  # noqa: E402
from _report import finite  # noqa: E402
from _stats import summarize_latencies  # noqa: E402

PY = sys.executable
MODEL = "llama3.2"
GENERATE = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()
HEADERS = {"Content-Type": "application/json"}
STRATEGIES = [
    "round_robin",
    "weighted_round_robin",
    "equal_weighted",
    "least_connections",
    "least_response_time",
    "score",
]

CORRAL_TOML = """\
[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"
log_format = "json"

[balancer]
strategy = "{strategy}"
model_affinity = false

[timeouts]
first_token_s = {timeout_s}

[queue]
max_size = {queue_size}
timeout_s = {timeout_s}

[gpu]
enabled = false

[[backends]]
id = "fast"
url = "{fast_url}"
max_concurrent = {max_concurrent}
weight = {fast_weight}

[[backends]]
id = "slow"
url = "{slow_url}"
max_concurrent = {max_concurrent}
weight = 1.0
"""


def _loop_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _session(timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        skip_auto_headers=("User-Agent",),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


# --- the client ------------------------------------------------------------------------------


async def _service_times(url: str, samples: int, warmup: int) -> list[float]:
    """Sequential requests straight to one simulator: its service time, nothing queued."""
    times: list[float] = []
    async with _session(60) as session:
        for i in range(warmup + samples):
            t0 = time.perf_counter()
            async with session.post(url + "/api/generate", data=GENERATE, headers=HEADERS) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status} while measuring")
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


async def _warmup(url: str, waves: int, width: int) -> None:
    """A few concurrent waves through corral: connections open, every backend measured."""
    async with _session(60) as session:

        async def one() -> None:
            async with session.post(url + "/api/generate", data=GENERATE, headers=HEADERS) as r:
                await r.read()

        for _ in range(waves):
            await asyncio.gather(*(one() for _ in range(width)))


async def _replay(
    url: str, schedule: Schedule, max_outstanding: int, timeout_s: float
) -> tuple[list[Outcome], int]:
    """Open loop: each arrival is its own task, sent at its scheduled time whatever the
    responses do. Arrivals beyond ``max_outstanding`` in flight are cut (counted, not sent)."""
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()
    cut = 0
    perf = time.perf_counter
    target = url + "/api/generate"
    async with _session(timeout_s) as session:
        t0 = perf() + 0.05

        async def one(scheduled: float) -> None:
            sent = perf() - t0
            status, backend, error = 0, None, None
            try:
                async with session.post(target, data=GENERATE, headers=HEADERS) as resp:
                    await resp.read()
                    status = resp.status
                    backend = resp.headers.get("X-Corral-Backend")
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            outcomes.append(Outcome(scheduled, sent, perf() - t0, status, backend, error))

        for at in schedule.times:
            delay = t0 + at - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_outstanding:
                cut += 1
                continue
            task = asyncio.create_task(one(at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(list(tasks))
    return outcomes, cut


# --- processes -------------------------------------------------------------------------------


class Bench:
    """Owns every process of the run; ``close()`` stops them all."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.procs: list[Proc] = []
        self.sims: dict[str, str] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.dir / f"{name}.log", env)
        self.procs.append(proc)
        return proc.start()

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                log(f"could not stop {proc.name}: {exc}")

    def start_sims(self) -> None:
        a = self.args
        for name, factor in (("fast", 1.0), ("slow", a.slowdown)):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = self.spawn(
                f"sim-{name}",
                [
                    *[PY, "-m", "corral.sim", "--port", str(port), "--name", name],
                    *["--ttft-ms", f"{a.ttft_ms * factor:g}"],
                    *["--token-interval-ms", f"{a.token_interval_ms * factor:g}"],
                    *["--tokens", str(a.tokens), "--num-parallel", str(a.parallel)],
                    *["--keep-alive-s", "3600"],
                ],
            )

            def up(u: str = url) -> bool:
                return http("GET", u + "/api/version") == 200

            wait_until(up, proc, f"sim {name}")
            self.sims[name] = url

    def measure_capacities(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, url in self.sims.items():
            times = _loop_run(_service_times(url, self.args.samples, 2))
            service = statistics.median(times)
            out[name] = {
                "service_ms": service * 1000,
                "service_min_ms": min(times) * 1000,
                "service_max_ms": max(times) * 1000,
                "capacity_rps": capacity(self.args.parallel, service),
            }
        return out

    def start_corral(self, strategy: str, queue: bool) -> tuple[Proc, str]:
        a = self.args
        port = free_port()
        name = f"corral-{key(strategy, queue)}"
        conf = self.dir / f"{name}.toml"
        conf.write_text(
            CORRAL_TOML.format(
                port=port,
                strategy=strategy,
                timeout_s=a.request_timeout,
                queue_size=max(512, a.max_outstanding),
                fast_url=self.sims["fast"],
                slow_url=self.sims["slow"],
                max_concurrent=a.parallel if queue else a.direct_max_concurrent,
                fast_weight=a.slowdown,
            )
        )
        exe = Path(PY).with_name("corral")
        argv = [str(exe)] if exe.exists() else [PY, "-m", "corral"]
        # No CORRAL_* from the caller's environment: the config file is the whole truth.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        proc = self.spawn(name, [*argv, "serve", "--config", str(conf)], env)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    return bool(json.load(resp).get("healthy", 0) >= len(self.sims))
            except (OSError, ValueError):
                return False

        wait_until(ready, proc, f"{name} /readyz")
        wait_until(lambda: http("POST", url + "/api/generate", GENERATE, 10) == 200, proc, name)
        return proc, url


def scrape(url: str) -> dict[str, float]:
    """corral's own counts: requests that waited in its queue, rejections, retries."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = dict.fromkeys(("corral_queued", "corral_queue_wait_s", "corral_rejected"), 0.0)
    out["corral_retried"] = 0.0
    pattern = re.compile(
        r"^(corral_queue_wait_seconds_(?:count|sum)|corral_rejections_total|corral_retries_total)"
        r"(\{[^}]*\})?\s+(\S+)$"
    )
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            name = {
                "corral_queue_wait_seconds_count": "corral_queued",
                "corral_queue_wait_seconds_sum": "corral_queue_wait_s",
                "corral_rejections_total": "corral_rejected",
                "corral_retries_total": "corral_retried",
            }[m.group(1)]
            out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


def fifo_yardstick(
    schedule: Schedule, caps: dict[str, dict[str, float]], parallel: int
) -> dict[str, float]:
    """What the queued configurations would get with no overhead at all (_balance_model)."""
    slots = [caps[name]["service_ms"] / 1000 for name in ("fast", "slow") for _ in range(parallel)]
    served = central_fifo(schedule.times, slots)
    lat = summarize_latencies([s.latency_s for s in served])
    on_fast = sum(1 for s in served if s.slot < parallel)
    return {
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "mean_ms": lat["mean_ms"],
        "fast_share": on_fast / len(served) if served else 0.0,
    }


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="corral's strategies on unequal simulated GPUs, with and without its queue",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=25.0, help="s of arrivals per config")
    p.add_argument("--load", type=float, default=0.95, help="mean arrival rate ÷ ideal capacity")
    p.add_argument("--burst", type=float, default=4.0, help="on ÷ off arrival intensity")
    p.add_argument("--mean-on", type=float, default=2.0, help="mean burst length, s")
    p.add_argument("--mean-off", type=float, default=3.0, help="mean lull length, s")
    p.add_argument("--quiet-tail", type=float, default=2.0, help="no burst in the last s")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2, help="slots per simulator (NUM_PARALLEL)")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="fast backend's ttft")
    p.add_argument("--token-interval-ms", type=float, default=10.0, help="fast backend's")
    p.add_argument("--tokens", type=int, default=16, help="tokens per response")
    p.add_argument("--slowdown", type=float, default=2.5, help="slow ÷ fast time per request")
    p.add_argument("--direct-max-concurrent", type=int, default=64, help="without the queue")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--modes", default="queue,direct", help="queue, direct or both")
    p.add_argument("--samples", type=int, default=8, help="service-time samples per simulator")
    p.add_argument("--max-outstanding", type=int, default=1000, help="arrivals beyond: cut")
    p.add_argument("--request-timeout", type=float, default=600.0, help="s, client and corral")
    p.add_argument("--quick", action="store_true", help="8 s per configuration: a smoke run")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "balance.json")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.samples = 8.0, 5
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        p.error(f"--strategies: unknown {unknown}; known: {', '.join(STRATEGIES)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"queue", "direct"}:
        p.error("--modes: queue, direct or queue,direct")
    args.strategy_list, args.mode_list = strategies, modes
    if not 0 < args.duration <= 600:
        p.error("--duration must be in (0, 600] s")
    if not (0 < args.load <= 2 and args.burst >= 1 and args.slowdown >= 1):
        p.error("--load must be in (0, 2], --burst and --slowdown at least 1")
    if not (1 <= args.parallel <= 64 and 1 <= args.max_outstanding <= 10_000):
        p.error("--parallel must be 1-64 and --max-outstanding 1-10000")
    if not 1 <= args.direct_max_concurrent <= 10_000:
        p.error("--direct-max-concurrent must be 1-10000")
    return args


def run(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    bench.start_sims()
    caps = bench.measure_capacities()
    ideal = sum(c["capacity_rps"] for c in caps.values())
    for name, c in caps.items():
        log(
            f"{name}: service {c['service_ms']:.1f} ms "
            f"({c['service_min_ms']:.1f}-{c['service_max_ms']:.1f}), "
            f"capacity {c['capacity_rps']:.2f} req/s"
        )
    schedule = bursty_schedule(
        args.load * ideal,
        args.duration,
        seed=args.seed,
        burst=args.burst,
        mean_on_s=args.mean_on,
        mean_off_s=args.mean_off,
        quiet_tail_s=args.quiet_tail,
    )
    log(
        f"ideal {ideal:.2f} req/s; schedule: {schedule.count} arrivals in {args.duration:g} s "
        f"({schedule.mean_rate:.2f}/s), bursts {schedule.on_fraction:.0%} of the time at "
        f"{schedule.peak_rate:.1f}/s, at most {schedule.max_in(1.0)} in 1 s"
    )
    yardstick = fifo_yardstick(schedule, caps, args.parallel)
    log(
        f"yardstick, a zero-overhead central FIFO queue on these arrivals: "
        f"p50 {yardstick['p50_ms']:.0f} ms, p99 {yardstick['p99_ms']:.0f} ms, "
        f"{yardstick['fast_share']:.0%} on fast"
    )
    results: dict[str, dict[str, Any]] = {}
    configs = [(s, m == "queue") for s in args.strategy_list for m in args.mode_list]
    for i, (strategy, queue) in enumerate(configs, 1):
        name = key(strategy, queue)
        proc, url = bench.start_corral(strategy, queue)
        try:
            _loop_run(_warmup(url, 2, 2 * args.parallel))
            cpu0 = total_cpu([proc.pid])
            outcomes, cut = _loop_run(
                _replay(url, schedule, args.max_outstanding, args.request_timeout)
            )
            counts = {"corral_cpu_s": total_cpu([proc.pid]) - cpu0}
            if not proc.alive():
                raise RuntimeError(f"{proc.name} died:\n{proc.tail()}")
            counts.update(scrape(url))
        finally:
            proc.stop()
            bench.procs.remove(proc)
        res = summarize(
            outcomes,
            offered=schedule.count,
            cut=cut,
            window_s=args.duration,
            ideal_rps=ideal,
            fast_id="fast",
        )
        res.update(strategy=strategy, queue=queue, **counts)
        results[name] = res
        log(
            f"[{i:2}/{len(configs)}] {name:<27} {res['throughput_rps']:5.2f} req/s "
            f"({res['share_of_ideal']:.3f} of ideal)  p50 {res['p50_ms']:6.0f} ms  "
            f"p99 {res['p99_ms']:6.0f} ms  fast {res['fast_share']:.0%}  "
            f"drain {res['drain_s']:4.1f} s  errors {res['errors']} cut {cut}  "
            f"queued in corral {counts.get('corral_queued', 0):.0f}  "
            f"corral cpu {counts['corral_cpu_s']:.1f} s"
        )
    after = bench.measure_capacities()
    for name, c in after.items():
        log(f"{name} after the runs: service {c['service_ms']:.1f} ms")
    return {
        "capacities": caps,
        "capacities_after": after,
        "ideal_rps": ideal,
        "yardstick": yardstick,
        "schedule": {
            "count": schedule.count,
            "mean_rate": schedule.mean_rate,
            "on_fraction": schedule.on_fraction,
            "peak_rate": schedule.peak_rate,
            "max_in_1s": schedule.max_in(1.0),
            "segments": [vars(s) for s in schedule.segments],
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every subprocess is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="corral-balance-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            out = run(args, bench)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 1
        finally:
            bench.close()

    results = out["results"]
    ver = verdicts(results)
    title = (
        f"{out['schedule']['count']} bursty arrivals in {args.duration:g} s at "
        f"{args.load:.0%} of ideal {out['ideal_rps']:.2f} req/s"
    )
    y = out["yardstick"]
    notes = [
        f"yardstick, a zero-overhead central FIFO queue on the same arrivals: "
        f"p50 {y['p50_ms']:,.0f} ms, p99 {y['p99_ms']:,.0f} ms, {y['fast_share']:.0%} on fast"
    ]
    print_table(results, ver, title, notes)
    print()
    print(markdown(results, ver, notes))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
        },
        "settings": settings,
        **out,
        "verdicts": ver,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(finite(report), indent=2, allow_nan=False) + "\n")
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
