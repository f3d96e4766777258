"""How much does corral cost? corral vs direct vs nginx vs an httpx forwarder, in one run.

Every target sits in front of the same simulated Ollama backends (``python -m corral.sim``, two
processes by default) on 127.0.0.1. Four phases, each in interleaved rounds (the target order
rotates every round), reported as the median of the rounds:

1. ``saturated``: small non-streaming POST /api/generate on ``--concurrency`` back-to-back
   connections: requests/s, p50/p99 latency, the proxy's CPU per request.
2. ``paced``: the same ``--concurrency`` connections at about ``--paced-rate`` req/s in all
   (think time between requests): the latency a proxy adds when it is not the bottleneck.
3. ``unloaded``: one connection, back to back: the added latency of a lone request.
4. ``stream``: ``--streams`` concurrent streams of ``--stream-tokens`` tokens
   ``--token-interval-ms`` apart: time to first byte, NDJSON chunks/s, CPU per chunk.

Phases 1-3 use wrk when it is installed (apt-get'ed when missing and we are root), else the
aiohttp generator (bench/_load.py); phase 4 always uses the aiohttp generator.

Targets: ``direct`` (the generator round-robins over the simulators itself), ``nginx``
(Debian's package; skipped if it cannot be installed), ``corral`` (log level warning),
``corral-info`` (the default log level: the access log on), ``httpx`` (a minimal httpx
forwarder, bench/_httpx_proxy.py).

    .venv/bin/python bench/overhead.py            # full run, about 6 minutes
    .venv/bin/python bench/overhead.py --quick    # smoke run, about 40 s

Prints a table and the same as markdown; writes bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _report  # noqa: E402
import _wrk  # noqa: E402
from _cpu import total_cpu  # noqa: E402
from _procs import (  # noqa: E402
    Proc,
    find_or_install,
    free_port,
    http,
    log,
    run_bounded,
    tool_version,
    wait_until,
)

PY = sys.executable
GENERATE_BODY = '{"model":"llama3.2","prompt":"hi","stream":false}'


@dataclass(frozen=True)
class Phase:
    name: str
    mode: str  # "generate" or "stream"
    conns: int
    duration_s: float
    think_ms: float = 0.0  # mean pause per connection between requests
    sim_timing: dict[str, float] = field(default_factory=dict)


@dataclass
class Target:
    name: str
    urls: list[str]
    proc: Proc | None = None  # None for direct
    note: str = ""
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream sims {{
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
            proxy_read_timeout 300s;
        }}
    }}
}}
"""

CORRAL_TOML = """\
[server]
host = "127.0.0.1"
port = {port}
log_level = "{log_level}"
log_format = "json"

[balancer]
strategy = "round_robin"

[gpu]
enabled = false

{backends}
"""


class Bench:
    """Owns every process of the run; ``close()`` stops them all."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.procs: list[Proc] = []
        self.sims: list[str] = []
        self.targets: list[Target] = []
        self.wrk: str | None = None
        self.versions: dict[str, str] = {}

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

    # -- set-up --

    def start_sims(self) -> None:
        a = self.args
        for i in range(a.sims):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = self.spawn(
                f"sim{i}",
                [
                    *[PY, "-m", "corral.sim", "--port", str(port), "--name", f"sim{i}"],
                    *["--ttft-ms", "0", "--token-interval-ms", "0", "--tokens", "2"],
                    *["--num-parallel", str(a.sim_parallel), "--keep-alive-s", "3600"],
                ],
            )
            wait_until(lambda u=url: http("GET", u + "/api/version") == 200, proc, f"sim{i}")
            self.sims.append(url)
        self.targets.append(Target("direct", list(self.sims), note="generator → simulators"))

    def configure_sims(self, timing: dict[str, float]) -> None:
        body = json.dumps(timing).encode()
        for url in self.sims:
            status = http("PUT", url + "/_sim/config", body)
            if status != 200:
                raise RuntimeError(f"PUT {url}/_sim/config answered {status}")

    def _ready(self, proc: Proc, url: str, what: str) -> None:
        body = GENERATE_BODY.encode()
        wait_until(lambda: http("POST", url + "/api/generate", body) == 200, proc, what)

    def start_nginx(self) -> None:
        nginx = find_or_install("nginx", ["nginx-light", "nginx"], self.args.install)
        if nginx is None:
            log("nginx: unavailable, its column is skipped")
            return
        self.versions["nginx"] = tool_version([nginx, "-v"])
        ndir = self.dir / "nginx"
        ndir.mkdir()
        port = free_port()
        servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in self.sims)
        conf = ndir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=ndir, servers=servers, port=port))
        url = f"http://127.0.0.1:{port}"
        proc = self.spawn("nginx", [nginx, "-p", str(ndir), "-c", str(conf), "-g", "daemon off;"])
        self._ready(proc, url, "nginx")
        self.targets.append(Target("nginx", [url], proc, "1 worker process, keepalive 64"))

    def start_corral(self, name: str, log_level: str) -> None:
        port = free_port()
        backends = "\n".join(
            f'[[backends]]\nid = "sim{i}"\nurl = "{u}"\nmax_concurrent = {self.args.sim_parallel}\n'
            for i, u in enumerate(self.sims)
        )
        conf = self.dir / f"{name}.toml"
        conf.write_text(CORRAL_TOML.format(port=port, log_level=log_level, backends=backends))
        exe = Path(PY).with_name("corral")
        argv = [str(exe)] if exe.exists() else [PY, "-m", "corral"]
        # No CORRAL_* from the caller's environment: the config file is the whole truth.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        proc = self.spawn(name, [*argv, "serve", "--config", str(conf)], env)
        url = f"http://127.0.0.1:{port}"

        def all_healthy() -> bool:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    return bool(json.load(resp).get("healthy", 0) >= len(self.sims))
            except (OSError, ValueError):
                return False

        wait_until(all_healthy, proc, f"{name} /readyz")
        self._ready(proc, url, name)
        self.targets.append(Target(name, [url], proc, f"log_level {log_level}, round_robin"))

    def start_httpx(self) -> None:
        port = free_port()
        backends = [x for u in self.sims for x in ("--backend", u)]
        url = f"http://127.0.0.1:{port}"
        proc = self.spawn(
            "httpx", [PY, str(BENCH / "_httpx_proxy.py"), "--port", str(port), *backends]
        )
        self._ready(proc, url, "httpx forwarder")
        self.targets.append(Target("httpx", [url], proc, "uvicorn + one httpx.AsyncClient"))

    # -- measuring --

    def measure(self, phase: Phase, target: Target) -> dict[str, Any]:
        """One run of ``phase`` against ``target``, with the CPU its process spent on it."""
        if target.proc is not None and not target.proc.alive():
            raise RuntimeError(f"{target.name} died:\n{target.proc.tail()}")
        proxy_pids = [target.proc.pid] if target.proc else []
        sim_pids = [p.pid for p in self.procs if p.name.startswith("sim")]
        if phase.mode == "generate" and self.wrk is not None:
            result = self._wrk(phase, target, proxy_pids, sim_pids)
        else:
            result = self._aiohttp(phase, target, proxy_pids, sim_pids)
        work = result.get("chunks" if phase.mode == "stream" else "requests")
        if proxy_pids and work:
            key = "cpu_us_per_chunk" if phase.mode == "stream" else "cpu_us_per_request"
            result[key] = result["proxy_cpu_s"] / work * 1e6
        result["proxy_cores"] = result.get("proxy_cpu_s", 0.0) / phase.duration_s
        result["sim_cores"] = result.get("sim_cpu_s", 0.0) / phase.duration_s
        return result

    def _aiohttp(
        self, phase: Phase, target: Target, proxy_pids: list[int], sim_pids: list[int]
    ) -> dict[str, Any]:
        a = self.args
        argv = [
            *[PY, str(BENCH / "_load.py"), "--mode", phase.mode],
            *[x for u in target.urls for x in ("--url", u)],
            *["--concurrency", str(phase.conns), "--duration", str(phase.duration_s)],
            *["--warmup", str(a.warmup), "--think-ms", str(phase.think_ms)],
            *[x for p in proxy_pids for x in ("--proxy-pid", str(p))],
            *[x for p in sim_pids for x in ("--sim-pid", str(p))],
        ]
        out = run_bounded(argv, a.warmup + phase.duration_s + 60)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["generator"] = "aiohttp"
        return result

    def _wrk(
        self, phase: Phase, target: Target, proxy_pids: list[int], sim_pids: list[int]
    ) -> dict[str, Any]:
        assert self.wrk is not None

        def wrk(seconds: float) -> dict[str, Any]:
            return _wrk.run(
                self.wrk or "wrk",
                self.dir,
                target.urls,
                "/api/generate",
                GENERATE_BODY,
                threads=len(self.sims),
                conns=phase.conns,
                seconds=max(1, round(seconds)),
                think_ms=phase.think_ms,
            )

        wrk(self.args.warmup)
        proxy0, sims0 = total_cpu(proxy_pids), total_cpu(sim_pids)
        result = wrk(phase.duration_s)
        result["proxy_cpu_s"] = total_cpu(proxy_pids) - proxy0
        result["sim_cpu_s"] = total_cpu(sim_pids) - sims0
        result["generator"] = "wrk"
        return result


# --- main -----------------------------------------------------------------------------------


def phases(args: argparse.Namespace) -> list[Phase]:
    fast = {"ttft_s": 0.0, "token_interval_s": 0.0, "tokens": 2}
    stream = {
        "ttft_s": 0.0,
        "token_interval_s": args.token_interval_ms / 1000,
        "tokens": args.stream_tokens,
    }
    think_ms = 1000 * args.concurrency / args.paced_rate
    return [
        Phase("saturated", "generate", args.concurrency, args.duration, sim_timing=fast),
        Phase("paced", "generate", args.concurrency, args.short_duration, think_ms, fast),
        Phase("unloaded", "generate", 1, args.short_duration, sim_timing=fast),
        Phase("stream", "stream", args.streams, args.duration, sim_timing=stream),
    ]


def rotations(items: list[Target], rounds: int) -> Iterator[tuple[int, list[Target]]]:
    """Each round starts one target later, so no target always runs first or last."""
    for r in range(rounds):
        k = r % len(items)
        yield r, items[k:] + items[:k]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="corral's overhead against direct, nginx and an httpx forwarder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=5.0, help="s per saturated/stream run")
    p.add_argument("--short-duration", type=float, default=3.0, help="s per paced/1-conn run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured s before each run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    p.add_argument("--concurrency", type=int, default=32, help="non-streaming connections")
    p.add_argument("--paced-rate", type=float, default=500, help="req/s offered when paced")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams")
    p.add_argument("--stream-tokens", type=int, default=32)
    p.add_argument("--token-interval-ms", type=float, default=5.0)
    p.add_argument("--sims", type=int, default=2, help="simulator processes (backends)")
    p.add_argument("--sim-parallel", type=int, default=64, help="slots per simulator")
    p.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto")
    p.add_argument("--targets", default="direct,nginx,corral,corral-info,httpx")
    p.add_argument("--no-install", dest="install", action="store_false", help="no apt-get")
    p.add_argument("--quick", action="store_true", help="1 short round: a smoke check")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "overhead.json")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.short_duration, args.warmup, args.rounds = 1.0, 1.0, 0.5, 1
    if not 1 <= args.rounds <= 20:
        p.error("--rounds must be 1-20")
    if not (0 < args.duration <= 120 and 0 < args.short_duration <= 120):
        p.error("durations must be in (0, 120] s")
    if not (1 <= args.concurrency <= 1024 and 1 <= args.streams <= 1024):
        p.error("--concurrency and --streams must be 1-1024")
    if not (1 <= args.sims <= 16 and args.paced_rate > 0):
        p.error("--sims must be 1-16 and --paced-rate positive")
    return args


def run(args: argparse.Namespace, bench: Bench, wanted: list[str]) -> list[Target]:
    if args.generator != "aiohttp":
        bench.wrk = find_or_install("wrk", ["wrk"], args.install)
        if bench.wrk is None and args.generator == "wrk":
            raise RuntimeError("wrk unavailable")
    if bench.wrk:
        bench.versions["wrk"] = tool_version([bench.wrk, "-v"])
    bench.start_sims()
    if "nginx" in wanted:
        bench.start_nginx()
    if "corral" in wanted:
        bench.start_corral("corral", "warning")
    if "corral-info" in wanted:
        bench.start_corral("corral-info", "info")
    if "httpx" in wanted:
        bench.start_httpx()
    targets = bench.targets
    log(f"targets: {', '.join(t.name for t in targets)}; {args.rounds} round(s)")
    for phase in phases(args):
        bench.configure_sims(phase.sim_timing)
        for r, order in rotations(targets, args.rounds):
            for target in order:
                res = bench.measure(phase, target)
                target.results.setdefault(phase.name, []).append(res)
                log(f"[{phase.name:<9} {r + 1}] {target.name:<11} {_brief(res)}")
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    # SIGTERM unwinds like Ctrl-C, so every subprocess is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            targets = run(args, bench, wanted)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 1
        finally:
            bench.close()

    med = {t.name: _report.medians(t.results) for t in targets}
    ver = _report.verdicts(med)
    _report.print_tables(med, ver)
    _warnings(med)
    print()
    print(_report.markdown(med, ver))
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "python": platform.python_version(),
            **bench.versions,
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "phases": [vars(p) for p in phases(args)],
        "targets": {t.name: t.note for t in targets},
        "medians": med,
        "verdicts": ver,
        "rounds": {t.name: t.results for t in targets},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_report.finite(report), indent=2, allow_nan=False) + "\n")
    log(f"wrote {args.json}")
    return 0


def _brief(res: dict[str, Any]) -> str:
    if res["mode"] == "stream":
        text = f"{res['chunks_per_s']:8,.0f} chunks/s  ttfb p50 {res['ttfb_p50_ms']:6.2f} ms"
    else:
        text = f"{res['rps']:8,.0f} req/s  p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms"
    cpu = res.get("cpu_us_per_request") or res.get("cpu_us_per_chunk")
    if cpu:
        text += f"  cpu {cpu:5.0f} µs"
    text += f"  cores: proxy {res['proxy_cores']:.2f} sims {res['sim_cores']:.2f}"
    if res.get("errors"):
        text += f"  errors {res['errors']} {res.get('error_kinds', '')}"
    return text


def _warnings(med: _report.Medians) -> None:
    def rps(name: str) -> float:
        return med.get(name, {}).get("saturated", {}).get("rps", math.nan)

    if "nginx" in med and not rps("direct") > rps("nginx"):
        log(
            "warning: direct did not beat nginx on req/s: the simulators or the generator, "
            "not the proxies, may be the bottleneck (try --sims 3)"
        )
    for name, phases_ in med.items():
        errors = sum(p.get("errors", 0) for p in phases_.values())
        if errors:
            log(f"warning: {name} had {int(errors)} failed requests")


if __name__ == "__main__":
    sys.exit(main())
