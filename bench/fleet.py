"""corral, ollama-herd and nginx in front of the same simulated GPU fleet, one after another.

Four simulators (``python -m corral.sim``), one per GPU: an H100 (80 GiB), two L40S (48 GiB)
and an A10 (24 GiB), each with the same five made-up models (4.9 to 40 GB), Ollama's cap of 3
loaded models, 4 parallel slots, and speeds scaled by GPU (bench/_fleet_workload.py). One
seeded chat workload (bench/_fleet_workload.py: ~100 multi-turn conversations on /api/chat,
streamed, shared system prompts, pasted documents, Zipf-popular models, calm and burst phases)
is replayed against each contender on *fresh* simulators, so every one starts with nothing
loaded and nothing cached:

- ``corral``: its defaults (least_connections, model and session affinity, central queue,
  ``max_concurrent = 4``), each backend reading its GPU from the simulator's dcgm page;
- ``herd``: ollama-herd's router and one node agent per simulator (bench/_herd.py: own venv,
  loopback only, no mDNS, no telemetry);
- ``nginx``: Debian's nginx, ``least_conn``, upstream keepalive, no buffering.

Everything runs ``--time-scale`` times faster than real (waits and simulator timings divided);
times are reported in real seconds. Per contender: completed turns of those sent, time to
first token (p50, p95, share within 1 s, follow-up turns' p50), cold loads, evictions and the
prompt-cache share (the simulators' own counters), and each GPU's busy share.

    .venv/bin/python bench/fleet.py                   # seed 1, load 0.6: about 5 minutes
    .venv/bin/python bench/fleet.py --quick           # a smoke run, under 2 minutes
    .venv/bin/python bench/fleet.py --seeds 1,2,3 --load 0.6,0.8
    .venv/bin/python bench/fleet.py --help

Prints a table per seed and load, then all of them as markdown; writes bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _herd  # noqa: E402
import aiohttp  # noqa: E402
from _affinity_workload import Change, count_changes  # noqa: E402
from _fleet_report import Outcome, markdown, plain, summarize  # noqa: E402
from _fleet_workload import (  # noqa: E402
    GPUS,
    MAX_LOADED_MODELS,
    MODELS,
    SLOTS,
    TTFT_TARGET_S,
    Conversation,
    Workload,
    build,
    request_sizes,
    zipf_weights,
)
from _procs import (  # noqa: E402
    Proc,
    find_or_install,
    free_port,
    http,
    log,
    tool_version,
    wait_until,
)
from _report import finite  # noqa: E402
from affinity import _ready, _watch  # noqa: E402
from balance import PY, Bench, _loop_run, scrape  # noqa: E402

CONTENDERS = ("corral", "herd", "nginx")
GPU_NAMES = {
    "h100": "NVIDIA H100 80GB HBM3",
    "l40s-a": "NVIDIA L40S",
    "l40s-b": "NVIDIA L40S",
    "a10": "NVIDIA A10",
}
NEW_SIM_FLAGS = ("--max-loaded-models", "--load-gbps", "--prefill-tps")

CORRAL_TOML = """\
[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"
log_format = "json"
"""
BACKEND_TOML = """
[[backends]]
id = "{id}"
url = "{url}"
max_concurrent = {slots}
gpu_metrics_url = "{url}/_sim/dcgm"
"""

NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_max_body_size 16m;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream sims {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sims;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def sim_flags() -> set[str]:
    """The simulator's options this checkout knows (the newer ones are optional)."""
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    try:
        done = subprocess.run(
            [PY, "-m", "corral.sim", "--help"], capture_output=True, timeout=60, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    text = done.stdout.decode(errors="replace")
    return {flag for flag in NEW_SIM_FLAGS if flag in text}


# --- the clients -----------------------------------------------------------------------------


async def _turns(
    session: aiohttp.ClientSession,
    url: str,
    conv: Conversation,
    t0: float,
    scale: float,
    stop_at: float,
    out: list[Outcome],
) -> None:
    """One user: waits for the chat's start, then sends each turn after thinking, with the
    whole history and the answers as received; gives up on the chat after a failed turn."""
    perf = time.perf_counter
    answers: list[str] = []
    await asyncio.sleep(max(0.0, t0 + conv.start_s / scale - perf()))
    for k, turn in enumerate(conv.turns):
        if k:
            await asyncio.sleep(turn.think_s / scale)
        if perf() >= stop_at:
            return
        sent = perf() - t0
        first: float | None = None
        parts: list[str] = []
        status, error, backend = 0, None, None
        try:
            async with session.post(url, json=conv.body(k, answers)) as resp:
                status = resp.status
                backend = resp.headers.get("X-Corral-Backend") or resp.headers.get("X-Fleet-Node")
                if status != 200:
                    await resp.read()
                else:
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        msg = json.loads(line)
                        if msg.get("error"):
                            error = "error in stream"
                        content = (msg.get("message") or {}).get("content") or ""
                        if content:
                            if first is None:
                                first = perf() - t0
                            parts.append(content)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            error = type(exc).__name__
        done = perf() - t0
        outcome = Outcome(conv.index, k, conv.model, sent, first, done, status, error, backend)
        out.append(outcome)
        if not outcome.ok:
            return
        answers.append("".join(parts))


async def _drive(
    args: argparse.Namespace, wl: Workload, url: str, sims: dict[str, str]
) -> tuple[list[Outcome], list[Change], float]:
    outcomes: list[Outcome] = []
    changes: list[Change] = []
    stop = asyncio.Event()
    scale = args.time_scale
    window = wl.window_s / scale
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=args.request_timeout),
        skip_auto_headers=("User-Agent",),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    async with session:
        t0 = time.perf_counter() + 0.1
        watcher = asyncio.create_task(_watch(session, sims, t0, 0.1, stop, changes))
        # No new turn after the window plus the longest tail a chat can have; then stop.
        stop_at = t0 + window + args.max_tail
        users = [
            _turns(session, url + "/api/chat", c, t0, scale, stop_at, outcomes)
            for c in wl.conversations
        ]
        try:
            await asyncio.wait_for(
                asyncio.gather(*users), timeout=window + args.max_tail + args.request_timeout
            )
        except TimeoutError:
            log("the run went past its bound; unfinished turns are not counted")
        finally:
            stop.set()
            await watcher
    wall = max((o.done_s for o in outcomes), default=0.0)
    return outcomes, changes, max(wall, window)


def sim_stats(sims: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for gpu, url in sims.items():
        with urllib.request.urlopen(url + "/_sim/stats", timeout=5) as resp:
            doc = json.load(resp)
        doc.pop("recent", None)
        out[gpu] = doc
    return out


# --- processes -------------------------------------------------------------------------------


class FleetBench(Bench):
    """The simulated GPUs and one contender at a time; ``stop_all`` ends them."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.flags = sim_flags()
        self.versions: dict[str, str] = {}
        self.runs = 0

    def sim_argv(self, i: int, port: int, wl: Workload) -> list[str]:
        g, s = GPUS[i], self.args.time_scale
        models = ",".join(f"{m.name}:{m.size_gb:g}" for m in MODELS)
        argv = [PY, "-m", "corral.sim", "--port", str(port), "--name", g.name]
        argv += ["--gpu-name", GPU_NAMES[g.name], "--vram-gb", f"{g.vram_gib:g}"]
        argv += ["--models", models, "--num-parallel", str(SLOTS)]
        argv += ["--token-interval-ms", f"{g.token_ms / s:g}", "--keep-alive-s", f"{300 / s:g}"]
        if "--max-loaded-models" in self.flags:
            argv += ["--max-loaded-models", str(MAX_LOADED_MODELS)]
        if self.args.shared_compute:
            argv += ["--shared-compute"]
        if "--prefill-tps" in self.flags:
            argv += ["--prefill-tps", f"{g.prefill_tps * s:g}"]
        else:  # a fixed TTFT: the mean request's prefill on this GPU
            sizes = request_sizes(wl.conversations)
            mean_prompt = sum(p for p, _ in sizes) / len(sizes)
            argv += ["--ttft-ms", f"{mean_prompt / g.prefill_tps * 1000 / s:g}"]
        if "--load-gbps" in self.flags:
            argv += ["--load-gbps", f"{g.load_gbps * s:g}"]
        else:  # a fixed load time: the mean model's, by popularity
            weights = zipf_weights(len(MODELS))
            mean_gb = sum(m.size_gb * w for m, w in zip(MODELS, weights, strict=True))
            argv += ["--load-ms", f"{mean_gb / g.load_gbps * 1000 / s:g}"]
        return argv

    def start_sims(self, wl: Workload) -> None:
        self.runs += 1
        self.sims = {}
        started = []
        for i, g in enumerate(GPUS):
            port = free_port()
            proc = self.spawn(f"sim-{g.name}-{self.runs}", self.sim_argv(i, port, wl))
            started.append((g.name, f"http://127.0.0.1:{port}", proc))
        for name, url, proc in started:
            wait_until(lambda u=url: http("GET", u + "/api/version") == 200, proc, name)
            self.sims[name] = url

    def start_corral(self) -> str:
        port = free_port()
        text = CORRAL_TOML.format(port=port)
        for gpu, url in self.sims.items():
            text += BACKEND_TOML.format(id=gpu, url=url, slots=SLOTS)
        if self.args.corral_config_extra:
            text += "\n" + self.args.corral_config_extra.strip() + "\n"
        conf = self.dir / f"corral-{self.runs}.toml"
        conf.write_text(text)
        # No CORRAL_* from the caller's environment: the config file is the whole truth.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        proc = self.spawn(
            f"corral-{self.runs}", [PY, "-m", "corral", "serve", "--config", str(conf)], env
        )
        url = f"http://127.0.0.1:{port}"
        n = len(self.sims)
        wait_until(lambda: _ready(url, n, n), proc, "corral backends and GPUs", 60)
        return url

    def start_herd(self) -> str:
        a = self.args
        data = self.dir / f"herd-{self.runs}"
        data.mkdir()
        env = _herd.herd_env(dict(os.environ), data, SLOTS, MAX_LOADED_MODELS)
        env.update(FLEET_LOG_LEVEL="WARNING", FLEET_CONSOLE_LOG_LEVEL="WARNING")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        router = self.spawn(f"herd-{self.runs}", _herd.router_argv(a.herd_venv, port), env)
        wait_until(lambda: http("GET", url + "/fleet/status") == 200, router, "herd router", 60)
        nodes: list[Proc] = []
        for g in GPUS:
            argv = _herd.node_argv(
                a.herd_venv,
                node_id=g.name,
                sim_url=self.sims[g.name],
                router_url=url,
                vram_gib=g.vram_gib,
                bandwidth_gbps=g.bandwidth_gbps,
                host_memory=a.herd_host_memory,
            )
            nodes.append(self.spawn(f"herd-node-{g.name}-{self.runs}", argv, env))

        def ready() -> bool:
            for node in nodes:
                if not node.alive():
                    raise RuntimeError(f"{node.name} exited:\n{node.tail()}")
            try:
                with urllib.request.urlopen(url + "/fleet/status", timeout=2) as resp:
                    doc = json.load(resp)
            except (OSError, ValueError):
                return False
            online = [
                n
                for n in doc.get("nodes", [])
                if n.get("status") == "online"
                and len((n.get("ollama") or {}).get("models_available") or []) >= len(MODELS)
            ]
            return len(online) >= len(GPUS)

        wait_until(ready, router, "herd nodes online", 60)
        return url

    def start_nginx(self) -> str | None:
        nginx = find_or_install("nginx", ["nginx-light", "nginx"], self.args.install)
        if nginx is None:
            return None
        self.versions["nginx"] = tool_version([nginx, "-v"])
        ndir = self.dir / f"nginx-{self.runs}"
        ndir.mkdir()
        port = free_port()
        servers = "\n".join(
            f"        server {u.removeprefix('http://')};" for u in self.sims.values()
        )
        conf = ndir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=ndir, servers=servers, port=port))
        argv = [nginx, "-p", str(ndir), "-c", str(conf), "-g", "daemon off;"]
        proc = self.spawn(f"nginx-{self.runs}", argv)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http("GET", url + "/api/version") == 200, proc, "nginx")
        return url

    def stop_all(self) -> None:
        self.close()
        self.procs.clear()


# --- main ------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="corral, ollama-herd and nginx on the same simulated GPU fleet",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seeds", default="1", help="comma list; one run per seed and load")
    p.add_argument("--load", default="0.6", help="offered ÷ nominal capacity; comma list")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--time-scale", type=float, help="run this many times faster [4; --quick: 8]")
    p.add_argument("--conversations", help="lo,hi: drawn per seed [90,110; --quick: 10,12]")
    p.add_argument("--corral-config-extra", default="", help="TOML appended to corral's config")
    p.add_argument(
        "--shared-compute",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="models on one GPU share its compute, as on a real GPU (default on)",
    )
    p.add_argument("--herd-venv", type=Path, default=BENCH / "results" / "herd-venv")
    p.add_argument(
        "--herd-host-memory",
        action="store_true",
        help="herd's nodes report this machine's RAM, not their GPU's memory",
    )
    p.add_argument("--no-install", dest="install", action="store_false", help="no apt-get/pip")
    p.add_argument("--request-timeout", type=float, default=120.0, help="s (wall) per turn")
    p.add_argument("--max-tail", type=float, default=150.0, help="s (wall) after the window")
    p.add_argument("--quick", action="store_true", help="10-12 chats at 8x: a smoke run")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "fleet.json")
    args = p.parse_args(argv)
    if args.time_scale is None:  # --quick: fewer chats, twice as fast: about 30 s each
        args.time_scale = 8.0 if args.quick else 4.0
    if args.conversations is None:
        args.conversations = "10,12" if args.quick else "90,110"
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.load_list = _floats(args.load)
        lo, hi = (int(x) for x in args.conversations.split(","))
    except ValueError:
        p.error("--seeds, --load and --conversations take comma lists of numbers")
    args.conversation_range = (lo, hi)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        p.error(f"--contenders: unknown {unknown}; known: {', '.join(CONTENDERS)}")
    args.contender_list = contenders
    if not args.seed_list or not args.load_list or not all(0 < x <= 5 for x in args.load_list):
        p.error("--seeds and --load need at least one value each, loads in (0, 5]")
    if not (1 <= lo <= hi <= 1000 and 0.5 <= args.time_scale <= 20):
        p.error("--conversations must be 1 <= lo <= hi <= 1000, --time-scale in [0.5, 20]")
    return args


def run_contender(
    args: argparse.Namespace, bench: FleetBench, wl: Workload, name: str
) -> dict[str, Any] | None:
    """One contender on fresh simulators; None when it cannot run here."""
    try:
        bench.start_sims(wl)
        if name == "corral":
            url: str | None = bench.start_corral()
        elif name == "herd":
            url = bench.start_herd()
        else:
            url = bench.start_nginx()
        if url is None:
            return None
        t = time.time()
        outcomes, changes, wall = _loop_run(_drive(args, wl, url, bench.sims))
        for proc in bench.procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} died:\n{proc.tail()}")
        stats = sim_stats(bench.sims)
        # corral's own count of requests that waited in its queue, and how long in all.
        extra = scrape(url) if name == "corral" else {}
        log(f"  {name}: {time.time() - t:.0f} s")
    finally:
        bench.stop_all()
    res = summarize(
        outcomes,
        planned=wl.requests,
        stats=stats,
        ps_counts=count_changes(changes),
        wall_s=wall,
        time_scale=args.time_scale,
        target_s=TTFT_TARGET_S,
    )
    if extra:
        res["corral_queued"] = int(extra.get("corral_queued", 0))
        res["corral_queue_wait_s"] = extra.get("corral_queue_wait_s", 0.0) * args.time_scale
    res["sims"] = stats
    # Every turn as its client saw it (wall seconds from the start), for a closer look.
    res["turns"] = [dataclasses.asdict(o) for o in outcomes]
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every subprocess is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="corral-fleet-") as tmp:
        bench = FleetBench(args, Path(tmp))
        missing = [f for f in NEW_SIM_FLAGS if f not in bench.flags]
        if missing:
            notes.append(
                f"this simulator lacks {', '.join(missing)}: fixed TTFT and load times instead"
            )
        if "herd" in args.contender_list:
            version = _herd.ensure_venv(args.herd_venv, args.install, log)
            if version is None:
                args.contender_list.remove("herd")
                notes.append("ollama-herd could not be installed: no herd row")
            else:
                bench.versions["ollama-herd"] = version
        try:
            for seed in args.seed_list:
                for load in args.load_list:
                    wl = build(seed, load, conversations=args.conversation_range)
                    log(
                        f"seed {seed}, load {load:g}: {len(wl.conversations)} conversations, "
                        f"{wl.requests} turns in {wl.window_s / args.time_scale:.0f} s "
                        f"(real {wl.window_s:.0f} s), capacity {wl.capacity_rps:.2f} req/s real"
                    )
                    results: dict[str, Any] = {}
                    for name in args.contender_list:
                        r = run_contender(args, bench, wl, name)
                        if r is None:
                            log(f"  {name}: unavailable here, skipped")
                            continue
                        results[name] = r
                    runs.append(
                        {
                            "seed": seed,
                            "load": load,
                            "conversations": len(wl.conversations),
                            "turns": wl.requests,
                            "window_s": wl.window_s,
                            "capacity_rps": wl.capacity_rps,
                            "results": results,
                        }
                    )
                    print(f"\nseed {seed}, load {load:g}\n{plain(results)}", flush=True)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 1
        finally:
            bench.close()

    gpus = " / ".join(g.name for g in GPUS)
    notes += [
        f"times in real seconds (wall × {args.time_scale:g}); TTFT target {TTFT_TARGET_S:g} s; "
        "'*': fewer turns sent than planned (a chat stops at its first failed turn)",
        f"busy and requests per GPU: {gpus}; cold loads, evictions and prompt cache from the "
        "simulators' scheduler counters",
    ]
    print()
    for run in runs:
        title = (
            f"seed {run['seed']}, load {run['load']:g}: {run['conversations']} conversations, "
            f"{run['turns']} turns"
        )
        print(f"**{title}**\n\n{markdown(run['results'])}\n")
    for note in notes:
        print(f"- {note}")
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": bench.versions,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "gpus": [vars(g) for g in GPUS],
        "models": [vars(m) for m in MODELS],
        "sim_flags": sorted(bench.flags),
        "notes": notes,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(finite(report), indent=2, allow_nan=False) + "\n")
    log(f"wrote {args.json} ({report['wall_s']:g} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
