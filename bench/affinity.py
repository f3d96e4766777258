"""Does model affinity spare cold loads? Round robin, affinity off and affinity on, one run.

Three simulated GPUs (``python -m corral.sim``, 12 GiB each, three 7-8B models of which any
two fit and all three do not; a cold load takes ``--load-ms``; Ollama's default keep_alive of
5 minutes) behind corral. Closed-loop clients (aiohttp) think, then ask for a model drawn from
a skewed mix (50/30/20), half of them streamed, 16-48 tokens each (bench/_affinity_workload.py:
the same seeded sequence per client in every configuration). Each configuration gets a fresh
corral over fresh simulators, so every one starts with nothing loaded:

- ``round_robin``, ``model_affinity = false``, no GPU readings: the baseline, a plain rotation
  as any load balancer that knows nothing of models or GPUs does it;
- ``least_connections``, ``model_affinity = false``: "affinity off";
- ``least_connections``, ``model_affinity = true``: "affinity on", corral's default.

In the last two corral reads the simulated GPUs' memory from their dcgm-exporter page
(``gpu_metrics_url``), as it would read real GPUs; with that, even without affinity a cold model
goes to a GPU with room for it rather than one that would evict. The baseline gets no GPU
readings, so it cannot do that. Cold loads are counted from the
simulators: their ``/api/ps`` is sampled every ``--ps-interval-ms``, and a model that appears
between two samples began loading (the simulators keep no load counter of their own).

    .venv/bin/python bench/affinity.py            # 3 configurations x 25 s, about 2 minutes
    .venv/bin/python bench/affinity.py --quick    # 3 x 4 s: a smoke run, under a minute
    .venv/bin/python bench/affinity.py --help

Prints a table and the same as markdown; writes bench/results/affinity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import aiohttp  # noqa: E402
from _affinity_report import (  # noqa: E402
    CONFIGS,
    Outcome,
    markdown,
    summarize,
    verdicts,
)
from _affinity_workload import (  # noqa: E402
    MODELS,
    Change,
    Step,
    client_steps,
    load_wait_s,
    parse_mix,
    resident_changes,
)
from _procs import free_port, http, log, wait_until  # noqa: E402
from _report import finite  # noqa: E402
from balance import PY, Bench, _loop_run, _session  # noqa: E402

CORRAL_TOML = """\
[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"
log_format = "json"

[balancer]
strategy = "{strategy}"
model_affinity = {affinity}

[timeouts]
first_token_s = {timeout_s}

[queue]
timeout_s = {timeout_s}

[gpu]
enabled = true
"""

BACKEND_TOML = """
[[backends]]
id = "{id}"
url = "{url}"
max_concurrent = {slots}
"""
GPU_TOML = 'gpu_metrics_url = "{url}/_sim/dcgm"\n'


# --- the clients and the watcher -------------------------------------------------------------


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    client: int,
    steps: Iterator[Step],
    t0: float,
    duration_s: float,
    max_requests: int,
    out: list[Outcome],
) -> None:
    """Think, send, read to the last byte; repeat until the window closes."""
    perf = time.perf_counter
    for _, step in zip(range(max_requests), steps, strict=False):
        left = t0 + duration_s - perf()
        await asyncio.sleep(min(step.think_s, max(0.0, left)))
        if perf() - t0 >= duration_s:
            return
        sent = perf() - t0
        status, backend, wait, error = 0, None, 0.0, None
        try:
            async with session.post(url, json=step.body()) as resp:
                body = await resp.read()
                status = resp.status
                backend = resp.headers.get("X-Corral-Backend")
                wait = load_wait_s(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = type(exc).__name__
        out.append(
            Outcome(
                client, step.model, step.stream, sent, perf() - t0, status, backend, wait, error
            )
        )


async def _ps(session: aiohttp.ClientSession, url: str) -> frozenset[str] | None:
    try:
        async with session.get(url + "/api/ps") as resp:
            data = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return frozenset(m.get("name", "?") for m in data.get("models") or [])


async def _watch(
    session: aiohttp.ClientSession,
    sims: dict[str, str],
    t0: float,
    interval_s: float,
    stop: asyncio.Event,
    changes: list[Change],
) -> None:
    """Sample every simulator's /api/ps until ``stop`` (then once more); record the changes."""
    before = {gpu: frozenset[str]() for gpu in sims}
    while True:
        last = stop.is_set()
        samples = await asyncio.gather(*(_ps(session, url) for url in sims.values()))
        at = time.perf_counter() - t0
        for gpu, now in zip(sims, samples, strict=True):
            if now is None:
                continue  # a missed sample: compare the next one with the last good one
            loaded, left = resident_changes(before[gpu], now)
            changes += [Change(at, gpu, m, True) for m in sorted(loaded)]
            changes += [Change(at, gpu, m, False) for m in sorted(left)]
            before[gpu] = now
        if last:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def _drive(
    args: argparse.Namespace, url: str, sims: dict[str, str]
) -> tuple[list[Outcome], list[Change], float]:
    outcomes: list[Outcome] = []
    changes: list[Change] = []
    stop = asyncio.Event()
    async with _session(args.request_timeout) as session:
        t0 = time.perf_counter()
        watcher = asyncio.create_task(
            _watch(session, sims, t0, args.ps_interval_ms / 1000, stop, changes)
        )
        clients = [
            _client(
                session,
                url + "/api/generate",
                i,
                client_steps(
                    args.seed,
                    i,
                    mix=args.mix_weights,
                    think_mean_s=args.think_s,
                    stream_share=args.stream_share,
                    tokens=(args.min_tokens, args.max_tokens),
                ),
                t0,
                args.duration,
                args.max_requests,
                outcomes,
            )
            for i in range(args.clients)
        ]
        try:
            await asyncio.gather(*clients)
        finally:
            stop.set()
            await watcher
        wall = max((o.done_s for o in outcomes), default=0.0)
    return outcomes, changes, max(wall, args.duration)


# --- processes -------------------------------------------------------------------------------


class AffinityBench(Bench):
    """balance.py's process owner, with this benchmark's simulators and corral."""

    def start_sims(self) -> None:
        a = self.args
        self.sims = {}
        for i in range(a.gpus):
            name, port = f"gpu{i}", free_port()
            url = f"http://127.0.0.1:{port}"
            proc = self.spawn(
                f"sim-{name}",
                [
                    *[PY, "-m", "corral.sim", "--port", str(port), "--name", name],
                    *["--gpu-index", str(i), "--vram-gb", f"{a.vram_gb:g}"],
                    *["--models", ",".join(MODELS), "--load-ms", f"{a.load_ms:g}"],
                    *["--ttft-ms", f"{a.ttft_ms:g}", "--token-interval-ms", f"{a.token_ms:g}"],
                    *["--num-parallel", str(a.slots)],
                ],
            )
            wait_until(lambda u=url: http("GET", u + "/api/version") == 200, proc, name)
            self.sims[name] = url

    def start_corral(self, strategy: str, affinity: bool, gpus: bool) -> tuple[Any, str]:
        a = self.args
        port = free_port()
        name = f"corral-{strategy}-{'on' if affinity else 'off'}"
        conf = self.dir / f"{name}.toml"
        text = CORRAL_TOML.format(
            port=port,
            strategy=strategy,
            affinity=str(affinity).lower(),
            timeout_s=a.request_timeout,
        )
        for gpu, url in self.sims.items():
            text += BACKEND_TOML.format(id=gpu, url=url, slots=a.slots)
            if gpus:
                text += GPU_TOML.format(url=url)
        conf.write_text(text)
        # No CORRAL_* from the caller's environment: the config file is the whole truth.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        proc = self.spawn(name, [PY, "-m", "corral", "serve", "--config", str(conf)], env)
        url = f"http://127.0.0.1:{port}"
        # Ready: every backend healthy (models listed) and every GPU's memory read.
        wanted = len(self.sims) if gpus else 0
        wait_until(lambda: _ready(url, len(self.sims), wanted), proc, f"{name} backends and GPUs")
        return proc, url

    def stop_all(self) -> None:
        self.close()
        self.procs.clear()


def _ready(url: str, backends: int, gpus: int) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            if json.load(resp).get("healthy", 0) < backends:
                return False
        with urllib.request.urlopen(url + "/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return False
    return text.count("\ncorral_gpu_memory_total_bytes{") >= gpus


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="cold loads and p95 with model affinity on, off, and round robin",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=25.0, help="s of requests per config")
    p.add_argument("--clients", type=int, default=12, help="closed-loop clients")
    p.add_argument("--think-s", type=float, default=1.0, help="mean think time per request")
    p.add_argument("--mix", default="50,30,20", help="weights of " + ", ".join(MODELS))
    p.add_argument("--stream-share", type=float, default=0.5, help="requests streamed")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gpus", type=int, default=3, help="simulated GPUs, one backend each")
    p.add_argument("--vram-gb", type=float, default=12.0, help="GiB per GPU")
    p.add_argument("--load-ms", type=float, default=2000.0, help="a cold model load")
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--token-ms", type=float, default=20.0, help="between tokens")
    p.add_argument("--slots", type=int, default=4, help="NUM_PARALLEL and max_concurrent")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--ps-interval-ms", type=float, default=50.0, help="/api/ps sampling")
    p.add_argument("--max-requests", type=int, default=1000, help="per client, at most")
    p.add_argument("--request-timeout", type=float, default=180.0, help="s, client and corral")
    p.add_argument("--quick", action="store_true", help="4 s per configuration: a smoke run")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "affinity.json")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 4.0
    try:
        args.mix_weights = parse_mix(args.mix)
    except ValueError as exc:
        p.error(f"--mix: {exc}")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        p.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    args.config_list = configs
    if not (0 < args.duration <= 600 and 1 <= args.clients <= 256 and 1 <= args.gpus <= 16):
        p.error("--duration must be in (0, 600] s, --clients 1-256, --gpus 1-16")
    if not (args.think_s > 0 and 0 <= args.stream_share <= 1 and 1 <= args.slots <= 64):
        p.error("--think-s must be positive, --stream-share in [0, 1], --slots 1-64")
    if not (0 < args.min_tokens <= args.max_tokens <= 4096 and args.load_ms >= 0):
        p.error("need 0 < --min-tokens <= --max-tokens <= 4096 and --load-ms >= 0")
    if not (5 <= args.ps_interval_ms < max(args.load_ms, 10) and args.max_requests >= 1):
        p.error("--ps-interval-ms must be at least 5 and shorter than --load-ms")
    return args


def run_config(args: argparse.Namespace, bench: AffinityBench, name: str) -> dict[str, Any]:
    """One configuration on fresh simulators and a fresh corral."""
    strategy, affinity, _ = CONFIGS[name]
    try:
        bench.start_sims()
        # The baseline is GPU-blind, like a load balancer that knows nothing of GPUs.
        proc, url = bench.start_corral(strategy, affinity, gpus=name != "round_robin")
        outcomes, changes, wall = _loop_run(_drive(args, url, bench.sims))
        if not proc.alive():
            raise RuntimeError(f"{proc.name} died:\n{proc.tail()}")
    finally:
        bench.stop_all()
    res = summarize(outcomes, changes, wall_s=wall, load_s=args.load_ms / 1000)
    res.update(strategy=strategy, model_affinity=affinity)
    res["changes"] = [vars(c) for c in changes]
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every subprocess is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-affinity-") as tmp:
        bench = AffinityBench(args, Path(tmp))
        try:
            for i, name in enumerate(args.config_list, 1):
                r = results[name] = run_config(args, bench, name)
                log(
                    f"[{i}/{len(args.config_list)}] {name:<13} {r['requests']:4} requests "
                    f"({r['throughput_rps']:.2f}/s), p50 {r['p50_ms']:6.0f} ms, "
                    f"p95 {r['p95_ms']:6.0f} ms, p99 {r['p99_ms']:6.0f} ms, "
                    f"cold loads {r['cold_loads']}, waited for a load {r['load_waits']}, "
                    f"errors {r['errors']}, by backend {r['by_backend']}"
                )
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 1
        finally:
            bench.close()

    ver = verdicts(results)
    weights = "/".join(f"{w:g}" for w in args.mix_weights)
    title = (
        f"{args.clients} clients × {args.duration:g} s per configuration, {len(MODELS)} models "
        f"({weights}) on {args.gpus} GPUs holding 2 each, cold load {args.load_ms / 1000:g} s"
    )
    notes = [
        "cold loads: models appearing in the simulators' /api/ps; waited for a load: requests "
        "whose load_duration was at least half a cold load; latency: send to last byte"
    ]
    print(f"{title}\n\n{markdown(results, ver, notes)}")
    wall_s = round(time.time() - started, 1)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": wall_s,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": vars(args),
        "models": MODELS,
        "results": results,
        "verdicts": ver,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    # default=str: the settings hold a Path.
    args.json.write_text(json.dumps(finite(report), indent=2, allow_nan=False, default=str) + "\n")
    log(f"wrote {args.json} ({wall_s:g} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
