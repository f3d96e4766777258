"""Does corral stay up, answer everything and keep its memory under mixed load and faults?

corral in front of ``--sims`` simulated backends (``python -m corral.sim``), all subprocesses.
A seeded open-loop client (bench/_soak_load.py) sends ``--rate`` requests per second (Poisson)
for ``--minutes``: /api/generate, /api/chat and /v1/chat/completions, streamed and not, two
models, 4-32 tokens; at most ``--max-outstanding`` in flight (arrivals beyond are skipped and
counted). Every ``--fault-every-s`` a fault starts on the next simulator in turn and lasts
``--fault-s``, rotating through:

- ``kill``: the simulator is SIGKILLed, and started again on its port when the fault ends;
- ``errors``: half its inference requests answer 500 (``PUT /_sim/faults``);
- ``hang``: it never answers inference (corral's ``first_token_s`` ends those requests);
- ``drop``: it drops the connection after 3 tokens, mid-stream;
- ``slow``: 2 s more before each first byte.

Every request is judged: complete, a clear error (status >= 400 with an error body, or a
stream ending in an error line), or *unanswered* (no end within ``--bound-s``, cut without an
error line, or not understandable). corral's RSS is sampled every second. Goals: no request
unanswered; RSS at the end (median of the last 5 s) under 1.1 times RSS after the ``--warmup-s``
warm-up (median of the next 5 s).

    .venv/bin/python bench/soak.py               # 10 minutes
    .venv/bin/python bench/soak.py --quick       # 1 minute, a fault every 10 s
    .venv/bin/python bench/soak.py --help

Prints a summary; writes bench/results/soak.json, bench/results/soak.png (req/s, latency
p50/p95 per 5-s window and RSS, faults shaded) and a smaller copy at docs/soak.png. The PNGs
need matplotlib: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import aiohttp  # noqa: E402
from _fleet import Fleet  # noqa: E402
from _procs import Proc, log  # noqa: E402
from _run import owned_run, write_report  # noqa: E402
from _sampler import MB, Sample, Sampler  # noqa: E402
from _soak_load import drive, schedule  # noqa: E402
from _soak_report import Fault, markdown, plot, rss_growth, summarize, verdicts, windows  # noqa: E402
from balance import _loop_run  # noqa: E402

FAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]] | None] = {
    # name: (PUT /_sim/faults to start it, to end it); None: a kill, not a setting
    "kill": None,
    "errors": ({"error_rate": 0.5}, {"error_rate": 0.0}),
    "hang": ({"hang": True}, {"hang": False}),
    "drop": ({"drop_after_tokens": 3}, {"drop_after_tokens": None}),
    "slow": ({"slow_s": 2.0}, {"slow_s": 0.0}),
}

SECTIONS = """
[health]
interval_s = 1
timeout_s = 1
fall = 2
rise = 1
backoff_max_s = 2
ejection_s = 2
max_ejection_s = 10

[timeouts]
connect_s = 1
first_token_s = {first_token_s:g}
idle_s = {idle_s:g}

[queue]
timeout_s = {queue_s:g}

"""


class SoakBench(Fleet):
    """Simulators that can be killed and started again on their port."""

    def sim_options(self) -> list[str]:
        a = self.args
        return [
            *["--ttft-ms", "20", "--token-interval-ms", f"{a.token_ms:g}"],
            *["--num-parallel", str(a.slots), "--keep-alive-s", "3600"],
        ]

    def proc_of(self, name: str) -> Proc:
        return next(p for p in reversed(self.procs) if p.name.split("@")[0] == name)

    def kill(self, name: str) -> None:
        proc = self.proc_of(name)
        assert proc.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(5)

    def restart(self, name: str, count: int) -> None:
        port = int(self.sims[name].rsplit(":", 1)[1])
        self.spawn(f"{name}@{count}", self.sim_argv(name, port))

    def corral(self) -> tuple[Proc, str]:
        a = self.args
        sections = SECTIONS.format(
            first_token_s=a.first_token_s, idle_s=a.idle_s, queue_s=a.queue_s
        )
        return self.start_corral("corral", sections, dict(self.sims), a.slots)


async def _up(session: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url + "/api/version") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come back within {timeout_s:g} s")


async def _set(session: aiohttp.ClientSession, url: str, faults: dict[str, Any]) -> None:
    async with session.put(url + "/_sim/faults", json=faults) as resp:
        if resp.status != 200:
            raise RuntimeError(f"PUT {url}/_sim/faults answered {resp.status}")


async def fault(
    bench: SoakBench, session: aiohttp.ClientSession, name: str, sim: str, count: int
) -> None:
    """Start fault ``name`` on ``sim``, hold it ``--fault-s``, end it (also when cancelled)."""
    url = bench.sims[sim]
    settings = FAULTS[name]
    if settings is None:
        await asyncio.to_thread(bench.kill, sim)
    else:
        await _set(session, url, settings[0])
    try:
        await asyncio.sleep(bench.args.fault_s)
    finally:
        if settings is None:
            await asyncio.to_thread(bench.restart, sim, count)
            await _up(session, url, 30)
        else:
            await _set(session, url, settings[1])


async def rotate(bench: SoakBench, t0: float, out: list[Fault]) -> None:
    """A fault every ``--fault-every-s``, names and simulators in turn, while the load runs."""
    a = bench.args
    names, sims = list(FAULTS), list(bench.sims)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        k = 0
        while (k + 1) * a.fault_every_s + a.fault_s < a.duration_s - 1:
            start = t0 + (k + 1) * a.fault_every_s
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            name, sim = names[k % len(names)], sims[k % len(sims)]
            log(f"{time.perf_counter() - t0:6.1f} s  fault {name} on {sim}")
            began = time.perf_counter() - t0
            try:
                await fault(bench, session, name, sim, k)
            finally:
                out.append(Fault(name, sim, began, time.perf_counter() - t0))
            k += 1


async def soak(bench: SoakBench, url: str) -> tuple[list[Any], int, list[Fault], float]:
    """The load and the faults; the outcomes, skipped arrivals, faults and the zero
    (``time.monotonic()``) of their times."""
    a = bench.args
    requests = schedule(a.seed, a.rate, a.duration_s, (4, 32))
    faults: list[Fault] = []
    t0, zero = time.perf_counter(), time.monotonic()
    rotation = asyncio.create_task(rotate(bench, t0, faults))
    try:
        outcomes, skipped = await drive(url, requests, t0, a.bound_s, a.max_outstanding)
    finally:
        rotation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rotation
    return outcomes, skipped, faults, zero


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="corral under mixed load with rotating faults: answers and memory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=30.0, help="requests per second (Poisson)")
    p.add_argument("--max-outstanding", type=int, default=128, help="in flight at most")
    p.add_argument("--sims", type=int, default=3, help="simulated backends")
    p.add_argument("--slots", type=int, default=8, help="NUM_PARALLEL and max_concurrent")
    p.add_argument("--token-ms", type=float, default=20.0, help="between tokens")
    p.add_argument("--fault-every-s", type=float, default=30.0)
    p.add_argument("--fault-s", type=float, default=10.0, help="how long each fault lasts")
    p.add_argument("--warmup-s", type=float, default=60.0, help="before the RSS baseline")
    p.add_argument("--first-token-s", type=float, default=8.0, help="corral's timeout")
    p.add_argument("--idle-s", type=float, default=4.0, help="corral's inter-chunk timeout")
    p.add_argument("--queue-s", type=float, default=10.0, help="corral's queue timeout")
    p.add_argument("--bound-s", type=float, default=30.0, help="no end by then: unanswered")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 minute, a fault every 10 s")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "soak.json")
    p.add_argument("--png", type=Path, default=BENCH / "results" / "soak.png")
    p.add_argument("--docs-png", type=Path, default=BENCH.parent / "docs" / "soak.png")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.fault_every_s, args.fault_s, args.warmup_s = 1.0, 10.0, 5.0, 10.0
    args.duration_s = args.minutes * 60
    if not (0 < args.minutes <= 240 and 0 < args.rate <= 500 and 1 <= args.sims <= 8):
        p.error("--minutes must be in (0, 240], --rate in (0, 500], --sims 1-8")
    if not (0 < args.fault_s < args.fault_every_s and 0 <= args.warmup_s < args.duration_s - 5):
        p.error("need 0 < --fault-s < --fault-every-s and --warmup-s at least 5 s before the end")
    if not args.bound_s > args.first_token_s + args.queue_s:
        p.error("--bound-s must exceed --first-token-s + --queue-s (corral answers by then)")
    if not (1 <= args.max_outstanding <= 1000 and 1 <= args.slots <= 256):
        p.error("--max-outstanding must be 1-1000 and --slots 1-256")
    return args


def run(bench: SoakBench) -> tuple[list[Any], int, list[Fault], list[Sample]]:
    """corral and its simulators up, the soak, corral's RSS on the load's clock."""
    bench.start_sims(bench.args.sims)
    proc, url = bench.corral()
    sampler = Sampler(proc.pid, 1.0).start()
    try:
        outcomes, skipped, faults, zero = _loop_run(soak(bench, url))
    finally:
        samples = sampler.stop()
    if not proc.alive():
        raise RuntimeError(f"corral died:\n{proc.tail()}")
    # On the load's clock (its zero is when the first request was due), from that zero on.
    offset = zero - sampler.t0
    return (
        outcomes,
        skipped,
        faults,
        [replace(s, t_s=s.t_s - offset) for s in samples if s.t_s >= offset],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    outcomes, skipped, faults, samples = owned_run(
        "corral-soak-", lambda tmp: SoakBench(args, tmp), run
    )
    summary = summarize(outcomes, skipped, args.duration_s)
    memory = rss_growth(samples, args.warmup_s, args.duration_s)
    wins = windows(outcomes, args.duration_s)
    print(markdown(summary, memory, faults))
    when = time.strftime("%Y-%m-%d", time.gmtime(started))
    title = (
        f"corral soak, {args.minutes:g} min of ~{args.rate:g} req/s mixed load, a fault every "
        f"{args.fault_every_s:g} s ({when}, {os.cpu_count()} CPUs)"
    )
    try:
        plot(
            wins, samples, faults, title, [(args.png, (10, 8), 100), (args.docs_png, (8, 6.4), 80)]
        )
        log(f"wrote {args.png} and {args.docs_png}")
    except ImportError:
        log("no plot: matplotlib is missing (pip install -e '.[bench]')")
    body = {
        "summary": summary,
        "memory": memory,
        "verdicts": verdicts(summary, memory),
        "faults": [vars(f) for f in faults],
        "windows": wins,
        "rss_mb": [[round(s.t_s, 2), s.rss_bytes / MB] for s in samples],
    }
    write_report(args.json, started, load_before, args, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
