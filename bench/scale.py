"""Does corral hold 1,000 streams, and what does routing cost with 100 backends? One run.

1. **Streams.** ``--sims`` simulated backends (``python -m corral.sim``, ``--num-parallel``
   high enough for all streams, one token every ``--token-ms``) behind one corral. Client
   subprocesses (bench/_scale_client.py, aiohttp) open ``--streams`` streamed ``/api/generate``
   requests at once and read them to their end, first straight to the simulators ("direct"),
   then through corral, with the same load. Each stream lasts ``--ramp-s + --hold-s``; the
   *hold window* runs from the moment every stream has its first byte (plus 0.5 s) to the
   first stream's end. Measured inside it:

   - corral's RSS and CPU, from /proc every ``--sample-ms`` (a thread of this process);
   - **per-chunk latency added**: every NDJSON line carries the simulator's wall clock in
     ``created_at`` (nanoseconds, taken just before the write); the client notes when the line
     arrived. arrival - created_at is the line's delay from the simulator to the client; the
     added latency is its p50 / p99 through corral minus the same direct, same load;
   - **loop responsiveness**: a thread of this process sends ``GET /`` to corral every
     ``--probe-ms`` on one kept-alive connection. corral's pure-ASGI front answers it on the
     event loop with no backend involved, so its latency is how long corral's loop takes to
     get to a new request: event-loop lag, plus the request's own cost and the machine's
     scheduling delay. The same probe during the direct phase (corral idle, the machine as
     loaded) shows that last part alone.

2. **Routing at 100 backends, in-process** (bench/_scale_routing.py): ``Router.pick()`` and
   ``Admission.acquire()`` + release, timed per call for every strategy with 2 and
   ``--backends`` backends (a third, or all, holding the requested model).

3. **Routing at 100 backends, end to end**: a fresh corral with 2 backends, then
   ``--backends`` - 2 more registered through the admin API (ids differ, URLs cycle over the
   simulators). With each, corral's CPU while idle (health checks) and per request at a fixed
   ``--rate`` of small non-streamed requests.

    .venv/bin/python bench/scale.py            # 1,000 streams, about 2.5 minutes
    .venv/bin/python bench/scale.py --quick    # 200 streams, a smoke run of about 30 s
    .venv/bin/python bench/scale.py --help

Prints the goals with PASS/MISS and the tables behind them; writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _scale_routing  # noqa: E402
from _cpu import cpu_seconds  # noqa: E402
from _fleet import Fleet  # noqa: E402
from _procs import Proc, http, log, run_bounded, wait_until  # noqa: E402
from _run import owned_run, write_report  # noqa: E402
from _sampler import (  # noqa: E402
    MB,
    Sampler,
    between,
    cpu_pressure,
    cpu_share,
    machine_busy,
    peak_rss,
    rss_bytes,
)
from _scale_report import (  # noqa: E402
    e2e_markdown,
    goals_markdown,
    hold_window,
    pairs_in,
    per_request,
    phases_markdown,
    probes_in,
    routing_markdown,
    routing_verdict,
    spread,
)
from affinity import _ready  # noqa: E402
from balance import PY  # noqa: E402

CLIENT = str(BENCH / "_scale_client.py")
LB = "/api/v1/loadbalancer"
SETTLE_S = 0.5

SECTIONS = """
[balancer]
strategy = "least_connections"

[timeouts]
first_token_s = 120

[queue]
max_size = {queue}
timeout_s = 120

"""


class LoopProbe:
    """``GET /`` on corral every ``interval_s`` from a thread; (t, latency s or None)."""

    def __init__(self, port: int, interval_s: float, t0: float) -> None:
        self.port, self.interval_s, self.t0 = port, interval_s, t0
        self.records: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-probe", daemon=True)

    def _run(self) -> None:
        conn: HTTPConnection | None = None
        mono, perf = time.monotonic, time.perf_counter
        next_at = mono()
        while not self._stop.is_set():
            at = mono() - self.t0
            latency: float | None = None
            try:
                if conn is None:
                    conn = HTTPConnection("127.0.0.1", self.port, timeout=2)
                t = perf()
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    latency = perf() - t
            except (OSError, HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            self.records.append((at, latency))
            # On schedule; a probe that overran skips the slots it missed instead of bursting.
            next_at = max(next_at + self.interval_s, mono())
            self._stop.wait(max(0.0, next_at - mono()))
        if conn is not None:
            conn.close()

    def start(self) -> LoopProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class ScaleBench(Fleet):
    """The simulators: slots for every stream, one token every ``--token-ms``."""

    def sim_options(self) -> list[str]:
        a = self.args
        return [
            *["--token-interval-ms", f"{a.token_ms:g}", "--keep-alive-s", "3600"],
            *["--num-parallel", str(a.slots), "--max-queue", str(a.streams)],
        ]

    def corral(self, name: str, backends: dict[str, str]) -> tuple[Proc, str]:
        sections = SECTIONS.format(queue=4 * self.args.streams)
        return self.start_corral(name, sections, backends, self.args.slots)


def _children_cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def hold_streams(
    args: argparse.Namespace, bench: ScaleBench, name: str, urls: list[str], zero: float
) -> tuple[list[dict[str, Any]], array[float], dict[str, float]]:
    """Run the stream clients once; their summaries, (arrival, delay) pairs and CPU use."""
    share, extra = divmod(args.streams, args.clients)
    per = [share + (i < extra) for i in range(args.clients)]
    start_at = time.time() + 1.5  # the clients import aiohttp meanwhile
    bound = 1.5 + args.ramp_s + args.hold_s + 60
    outs = [bench.dir / f"{name}-{i}.bin" for i in range(args.clients)]
    argvs = [
        [
            *[PY, CLIENT, "--mode", "streams", *[f"--url={u}" for u in urls]],
            *["--zero", repr(zero), "--start-at", repr(start_at), "--streams", str(n)],
            *["--tokens", str(args.tokens), "--out", str(out)],
        ]
        for n, out in zip(per, outs, strict=True)
    ]
    cpu0 = _children_cpu_s()
    with ThreadPoolExecutor(len(argvs)) as pool:
        texts = list(pool.map(lambda argv: run_bounded(argv, bound), argvs))
    # Only the clients end meanwhile, so the children's CPU that grew is theirs.
    usage = {"client_cpu_share": (_children_cpu_s() - cpu0) / (time.time() - start_at)}
    usage["client_cpu_share"] /= args.clients
    pairs: array[float] = array("d")
    for out in outs:
        pairs.frombytes(out.read_bytes())
    return [json.loads(t) for t in texts], pairs, usage


def stream_phase(
    args: argparse.Namespace,
    bench: ScaleBench,
    name: str,
    urls: list[str],
    clock: tuple[float, float],  # (wall, monotonic) zero
    sampler: Sampler,
    probe: LoopProbe,
) -> dict[str, Any]:
    """One phase: hold the streams, then summarize the hold window."""
    clients, pairs, usage = hold_streams(args, bench, name, urls, clock[0])
    start, end = hold_window(clients, SETTLE_S)
    # Wall and monotonic zeros were read together: the windows line up to within a few µs.
    samples = between(sampler.samples, start, end)
    window = (samples[0].t_s, samples[-1].t_s) if len(samples) >= 2 else (start, end)
    delays = pairs_in(pairs, *window)
    cpu_s = samples[-1].cpu_s - samples[0].cpu_s if len(samples) >= 2 else math.nan
    streams = sum(c["streams"] for c in clients)
    ttfb = [t * 1000 for c in clients for t in c["ttfb_s"]]
    span = window[1] - window[0]
    return {
        "streams": streams,
        "complete": sum(c["complete"] for c in clients),
        "errors": sum(c["errors"] for c in clients),
        "error_kinds": [c["error_kinds"] for c in clients],
        "held": sum(c["answered"] for c in clients) if end > start else 0,
        "window": [start, end],
        "window_s": max(0.0, end - start),
        "ttfb": spread(ttfb),
        "lines_per_s": len(delays) / span if span > 0 else math.nan,
        "delay": spread(delays),
        "probe": probes_in(probe.records, start, end),
        "rss_peak_mb": peak_rss(samples) / MB,
        "cpu_share": cpu_share(samples),
        "machine_busy": machine_busy(samples),
        "cpu_pressure": cpu_pressure(samples),
        "cpu_us_per_chunk": cpu_s / len(delays) * 1e6 if delays else math.nan,
        **usage,
    }


def register(url: str, sims: list[str], first: int, count: int) -> None:
    """``count`` more backends through the admin API, ids from ``first``, URLs cycling."""
    for i in range(first, first + count):
        body = json.dumps({"id": f"reg{i:03d}", "url": sims[i % len(sims)], "max_concurrent": 4})
        status = http("POST", url + f"{LB}/backends", body.encode(), timeout_s=10)
        if status != 201:
            raise RuntimeError(f"registering backend reg{i:03d}: HTTP {status}")


def end_to_end(args: argparse.Namespace, bench: ScaleBench) -> dict[str, dict[str, Any]]:
    """corral's CPU, idle and per request at ``--rate``, with 2 and ``--backends`` backends."""
    sims = list(bench.sims.values())
    proc, url = bench.corral("corral-e2e", {"sim0": sims[0], "sim1": sims[1 % len(sims)]})
    out: dict[str, dict[str, Any]] = {}
    for n in (2, args.backends):
        if n > 2:
            register(url, sims, 2, n - 2)
            wait_until(lambda n=n: _ready(url, n, 0), proc, f"{n} backends healthy")
        c0 = cpu_seconds(proc.pid)
        time.sleep(args.idle_s)  # nothing to poll: this measures the idle background itself
        idle_share = (cpu_seconds(proc.pid) - c0) / args.idle_s
        argv = [
            *[PY, CLIENT, "--mode", "paced", f"--url={url}", "--zero", repr(time.time())],
            *["--rate", f"{args.rate:g}", "--duration", f"{args.paced_s:g}"],
            *["--proxy-pid", str(proc.pid)],
        ]
        r = json.loads(run_bounded(argv, args.paced_s + 60))
        raw, net = per_request(r["proxy_cpu_s"], idle_share, r["window_s"], r["requests"])
        out[str(n)] = {**r, "idle_cpu_share": idle_share, "cpu_us_per_request": raw}
        out[str(n)]["net_us_per_request"] = net
        log(
            f"e2e, {n} backends: idle CPU {idle_share:.1%}, {r['rps']:.0f} req/s, "
            f"p50 {r['p50_ms']:.2f} ms, {raw:.0f} µs CPU/request ({net:.0f} net of idle), "
            f"errors {r['errors']}"
        )
    proc.stop()
    bench.procs.remove(proc)
    return out


def run(args: argparse.Namespace, bench: ScaleBench) -> dict[str, Any]:
    bench.start_sims(args.sims)
    proc, url = bench.corral("corral", dict(bench.sims))
    clock = (time.time(), time.monotonic())
    sampler = Sampler(proc.pid, args.sample_ms / 1000, clock[1]).start()
    probe = LoopProbe(int(url.rsplit(":", 1)[1]), args.probe_ms / 1000, clock[1]).start()
    phases: dict[str, dict[str, Any]] = {}
    rss_idle = rss_bytes(proc.pid)
    try:
        for name, urls in (("direct", list(bench.sims.values())), ("corral", [url])):
            p = phases[name] = stream_phase(args, bench, name, urls, clock, sampler, probe)
            log(
                f"{name}: {p['complete']}/{p['streams']} streams complete, {p['held']} held "
                f"for {p['window_s']:.1f} s, line delay p50 {p['delay']['p50_ms']:.2f} ms "
                f"p99 {p['delay']['p99_ms']:.2f} ms, probe p99 {p['probe']['p99_ms']:.2f} ms, "
                f"corral RSS {p['rss_peak_mb']:.0f} MB CPU {p['cpu_share']:.0%}, "
                f"clients {p['client_cpu_share']:.0%} each, machine {p['machine_busy']:.0%} "
                f"busy, CPU pressure {p['cpu_pressure']:.0%}"
            )
            if not proc.alive():
                raise RuntimeError(f"corral died:\n{proc.tail()}")
    finally:
        probe.stop()
        samples = sampler.stop()
    rss_after = rss_bytes(proc.pid)
    proc.stop()
    bench.procs.remove(proc)
    log(f"routing in-process, {args.iterations} calls per strategy and fleet ...")
    routing = _scale_routing.run(args.backends, args.iterations)
    e2e = end_to_end(args, bench)
    return {
        "streams": args.streams,
        "backends": args.backends,
        "phases": phases,
        "rss_idle_mb": rss_idle / MB,
        "rss_after_mb": rss_after / MB,
        "routing": routing,
        "routing_worst": routing_verdict(routing, args.backends),
        "e2e": e2e,
        "samples": [[s.t_s, s.rss_bytes, s.cpu_s] for s in samples],
        "probes": probe.records,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="corral with 1,000 held streams and with 100 backends",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--streams", type=int, default=1000, help="held at once")
    p.add_argument("--sims", type=int, default=4, help="simulated backends for the streams")
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--token-ms", type=float, default=100.0, help="between a stream's tokens")
    p.add_argument("--ramp-s", type=float, default=8.0, help="allowed for opening them all")
    p.add_argument("--hold-s", type=float, default=20.0, help="then held this long")
    p.add_argument("--probe-ms", type=float, default=10.0, help="loop probe interval")
    p.add_argument("--sample-ms", type=float, default=500.0, help="RSS/CPU sampling interval")
    p.add_argument("--backends", type=int, default=100, help="for the routing cost")
    p.add_argument("--iterations", type=int, default=1000, help="timed calls per strategy")
    p.add_argument("--rate", type=float, default=200.0, help="req/s, end-to-end routing")
    p.add_argument("--paced-s", type=float, default=8.0, help="s at --rate per fleet size")
    p.add_argument("--idle-s", type=float, default=5.0, help="idle CPU, s (a health round)")
    p.add_argument("--quick", action="store_true", help="200 streams, short phases: a smoke run")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "scale.json")
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.ramp_s, args.hold_s = 200, 2.0, 3.0
        args.iterations, args.paced_s, args.idle_s = 100, 2.0, 1.0
    if not (1 <= args.streams <= 5000 and 1 <= args.sims <= 16 and 1 <= args.clients <= 8):
        p.error("--streams must be 1-5000, --sims 1-16, --clients 1-8")
    if not (args.token_ms >= 10 and 0 < args.ramp_s <= 60 and 1 <= args.hold_s <= 300):
        p.error("--token-ms must be at least 10, --ramp-s in (0, 60], --hold-s 1-300")
    if not (3 <= args.backends <= 1000 and 10 <= args.iterations <= 100_000):
        p.error("--backends must be 3-1000 and --iterations 10-100000")
    if not (0 < args.rate <= 2000 and 0 < args.paced_s <= 60 and 0 < args.idle_s <= 60):
        p.error("--rate must be in (0, 2000], --paced-s and --idle-s in (0, 60]")
    if not (1 <= args.probe_ms <= 1000 and 50 <= args.sample_ms <= 5000):
        p.error("--probe-ms must be 1-1000 and --sample-ms 50-5000")
    args.slots = math.ceil(args.streams / args.sims) + 4
    args.tokens = math.ceil((args.ramp_s + args.hold_s) * 1000 / args.token_ms) + 1
    return args


def report(args: argparse.Namespace, out: dict[str, Any]) -> str:
    phases = out["phases"]
    return "\n\n".join(
        [
            f"{args.streams:,} streams over {args.sims} simulators ({args.clients} client "
            f"processes), one token every {args.token_ms:g} ms; routing with "
            f"{args.backends} backends",
            goals_markdown(out),
            "Streams, direct and through corral (the direct row's corral columns: corral idle):",
            phases_markdown(phases),
            f"corral RSS idle {out['rss_idle_mb']:.0f} MB, after the streams ended "
            f"{out['rss_after_mb']:.0f} MB.",
            "Routing in-process, Admission.acquire() + release per request:",
            routing_markdown(out["routing"]),
            f"Routing end to end, {args.rate:g} req/s of small non-streamed requests "
            f"for {args.paced_s:g} s (every backend holds the model):",
            e2e_markdown(out["e2e"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    out = owned_run("corral-scale-", lambda tmp: ScaleBench(args, tmp), lambda b: run(args, b))
    print(report(args, out))
    write_report(args.json, started, load_before, args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
