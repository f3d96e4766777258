"""How much does corral cost? corral vs direct vs nginx vs an httpx forwarder, in one run.

Every target sits in front of the same two backends on 127.0.0.1. By default (``--backend
fast``) they are bench/_fast_backend.py, a minimal asyncio HTTP/1.1 responder with canned
Ollama answers, fast enough that the proxy, not the backend, is what is measured (with the
simulators nginx was capped by them). ``--backend sim`` puts the simulators (``python -m
corral.sim``) there instead, as before. Five phases, each in interleaved rounds (the target
order rotates every round), reported as the median of the rounds:

1. ``saturated``: small non-streaming POST /api/generate on ``--concurrency`` back-to-back
   connections (``wrk -t1 -c32``): requests/s, p50/p99 latency, the proxy's CPU per request.
2. ``paced``: the same ``--concurrency`` connections at about ``--paced-rate`` req/s in all
   (think time between requests): the latency a proxy adds when it is not the bottleneck.
3. ``unloaded``: one connection, back to back: the added latency of a lone request.
4. ``stream_chat``: ``--streams`` concurrent streams on /api/chat (NDJSON) of
   ``--stream-tokens`` tokens ``--token-interval-ms`` apart, every stream the same opening
   user message (different users, not one conversation; no ``X-Session-ID``): chunks/s, time
   to first byte and to the whole answer (p50/p99), CPU per chunk.
5. ``stream_v1``: the same on /v1/chat/completions (server-sent events, ``data: [DONE]``).

Phases 1-3 use wrk when it is installed (apt-get'ed when missing and we are root), else the
aiohttp generator (bench/_load.py); phases 4-5 always use the aiohttp generator. With
``--pin`` (the default where there are 2+ CPUs) the generator runs on CPU 0 and everything
else (proxies, backends) on the other CPUs, so that the generator does not take the proxy's
CPU (on the 2-core box it is what brings direct closest to 3 times nginx).

Targets: ``direct`` (the generator goes to the backends itself; wrk's one thread to the
first), ``nginx`` (Debian's package; skipped if it cannot be installed), ``corral`` (its
default config: least_connections, model and session affinity, metrics, the access log at the
default level ``info``; only ``max_concurrent`` is raised to ``--max-concurrent`` per backend,
what the backends can take), ``httpx`` (a minimal httpx forwarder, bench/_httpx_proxy.py);
optionally ``corral-quiet`` (the same with log level ``warning``: no access log).

    .venv/bin/python bench/overhead.py            # full run, about 6 minutes
    .venv/bin/python bench/overhead.py --quick    # smoke run, about a minute
    .venv/bin/python bench/overhead.py --backend sim --targets direct,nginx,corral

Prints the tables and the same as markdown; writes bench/results/overhead.json.
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
DEFAULT_TARGETS = "direct,nginx,corral,corral-aiohttp,httpx"
KNOWN_TARGETS = ("direct", "nginx", "corral", "corral-quiet", "corral-aiohttp", "httpx")


@dataclass(frozen=True)
class Phase:
    name: str
    mode: str  # "generate" or "stream"
    conns: int
    duration_s: float
    think_ms: float = 0.0  # mean pause per connection between requests
    sim_timing: dict[str, float] = field(default_factory=dict)  # --backend sim only
    path: str = "/api/generate"  # what is streamed (stream mode)


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

# corral's defaults but for where it listens, the log level of corral-quiet and each
# backend's max_concurrent (the default 4, Ollama's default OLLAMA_NUM_PARALLEL, would queue
# 32 connections in corral in front of backends that take any number).
CORRAL_TOML = """\
[server]
host = "127.0.0.1"
port = {port}
{log_level}
{backends}
"""


class Bench:
    """Owns every process of the run; ``close()`` stops them all."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.procs: list[Proc] = []
        self.backends: list[str] = []
        self.targets: list[Target] = []
        self.wrk: str | None = None
        self.versions: dict[str, str] = {}
        # (generator's CPUs, everyone else's), or None: not pinned.
        self.cpus: tuple[set[int], set[int]] | None = pin_plan(args.pin)

    @property
    def gen_cpus(self) -> set[int] | None:
        return self.cpus[0] if self.cpus else None

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        cpus = self.cpus[1] if self.cpus else None
        proc = Proc(name, argv, self.dir / f"{name}.log", env, cpus=cpus)
        self.procs.append(proc)
        return proc.start()

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                log(f"could not stop {proc.name}: {exc}")

    # -- set-up --

    def start_backends(self) -> None:
        a = self.args
        for i in range(a.backends):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if a.backend == "fast":
                argv = [
                    *[PY, str(BENCH / "_fast_backend.py"), "--port", str(port)],
                    *["--tokens", str(a.stream_tokens)],
                    *["--token-interval-ms", str(a.token_interval_ms)],
                ]
            else:
                argv = [
                    *[PY, "-m", "corral.sim", "--port", str(port), "--name", f"sim{i}"],
                    *["--ttft-ms", "0", "--token-interval-ms", "0", "--tokens", "2"],
                    *["--num-parallel", str(a.max_concurrent), "--keep-alive-s", "3600"],
                ]
            proc = self.spawn(f"backend{i}", argv)
            wait_until(lambda u=url: http("GET", u + "/api/version") == 200, proc, f"backend{i}")
            self.backends.append(url)
        what = "fast backends" if a.backend == "fast" else "simulators"
        note = f"generator → {what} (wrk: its threads in turn, one thread → the first)"
        self.targets.append(Target("direct", list(self.backends), note=note))

    def configure_sims(self, timing: dict[str, float]) -> None:
        """The simulators' timing for a phase (--backend sim; the fast one has its flags)."""
        if self.args.backend != "sim":
            return
        body = json.dumps(timing).encode()
        for url in self.backends:
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
        servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in self.backends)
        conf = ndir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=ndir, servers=servers, port=port))
        url = f"http://127.0.0.1:{port}"
        proc = self.spawn("nginx", [nginx, "-p", str(ndir), "-c", str(conf), "-g", "daemon off;"])
        self._ready(proc, url, "nginx")
        self.targets.append(Target("nginx", [url], proc, "1 worker process, keepalive 64"))

    def start_corral(self, name: str, log_level: str | None, *, aiohttp: bool = False) -> None:
        port = free_port()
        backends = "\n".join(
            f'[[backends]]\nid = "b{i}"\nurl = "{u}"\nmax_concurrent = {self.args.max_concurrent}\n'
            for i, u in enumerate(self.backends)
        )
        level = f'log_level = "{log_level}"\n' if log_level else ""
        conf = self.dir / f"{name}.toml"
        conf.write_text(CORRAL_TOML.format(port=port, log_level=level, backends=backends))
        exe = Path(PY).with_name("corral")
        argv = [str(exe)] if exe.exists() else [PY, "-m", "corral"]
        # No CORRAL_* from the caller's environment: the config file is the whole truth.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        if aiohttp:  # the same, over the aiohttp transport (bench/_corral_aiohttp.py)
            argv = [PY, str(BENCH / "_corral_aiohttp.py"), "--config", str(conf)]
        else:
            argv = [*argv, "serve", "--config", str(conf)]
        proc = self.spawn(name, argv, env)
        url = f"http://127.0.0.1:{port}"

        def all_healthy() -> bool:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    return bool(json.load(resp).get("healthy", 0) >= len(self.backends))
            except (OSError, ValueError):
                return False

        wait_until(all_healthy, proc, f"{name} /readyz")
        self._ready(proc, url, name)
        what = f"log_level {log_level}" if log_level else "access log on (info)"
        note = f"default config, {what}, max_concurrent {self.args.max_concurrent}"
        if aiohttp:
            note += ", aiohttp upstream client"
        self.targets.append(Target(name, [url], proc, note))

    def start_httpx(self) -> None:
        port = free_port()
        backends = [x for u in self.backends for x in ("--backend", u)]
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
        backend_pids = [p.pid for p in self.procs if p.name.startswith("backend")]
        if phase.mode == "generate" and self.wrk is not None:
            result = self._wrk(phase, target, proxy_pids, backend_pids)
        else:
            result = self._aiohttp(phase, target, proxy_pids, backend_pids)
        work = result.get("chunks" if phase.mode == "stream" else "requests")
        if proxy_pids and work:
            key = "cpu_us_per_chunk" if phase.mode == "stream" else "cpu_us_per_request"
            result[key] = result["proxy_cpu_s"] / work * 1e6
        result["proxy_cores"] = result.get("proxy_cpu_s", 0.0) / phase.duration_s
        result["backend_cores"] = result.get("sim_cpu_s", 0.0) / phase.duration_s
        return result

    def _aiohttp(
        self, phase: Phase, target: Target, proxy_pids: list[int], backend_pids: list[int]
    ) -> dict[str, Any]:
        a = self.args
        argv = [
            *[PY, str(BENCH / "_load.py"), "--mode", phase.mode, "--path", phase.path],
            *[x for u in target.urls for x in ("--url", u)],
            *["--concurrency", str(phase.conns), "--duration", str(phase.duration_s)],
            *["--warmup", str(a.warmup), "--think-ms", str(phase.think_ms)],
            *[x for p in proxy_pids for x in ("--proxy-pid", str(p))],
            *[x for p in backend_pids for x in ("--sim-pid", str(p))],
        ]
        out = run_bounded(argv, a.warmup + phase.duration_s + 60, self.gen_cpus)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["generator"] = "aiohttp"
        return result

    def _wrk(
        self, phase: Phase, target: Target, proxy_pids: list[int], backend_pids: list[int]
    ) -> dict[str, Any]:
        assert self.wrk is not None

        def wrk(seconds: float) -> dict[str, Any]:
            return _wrk.run(
                self.wrk or "wrk",
                self.dir,
                target.urls,
                "/api/generate",
                GENERATE_BODY,
                threads=self.args.wrk_threads,
                conns=phase.conns,
                seconds=max(1, round(seconds)),
                think_ms=phase.think_ms,
                cpus=self.gen_cpus,
            )

        wrk(self.args.warmup)
        proxy0, backends0 = total_cpu(proxy_pids), total_cpu(backend_pids)
        result = wrk(phase.duration_s)
        result["proxy_cpu_s"] = total_cpu(proxy_pids) - proxy0
        result["sim_cpu_s"] = total_cpu(backend_pids) - backends0
        result["generator"] = f"wrk -t{min(self.args.wrk_threads, phase.conns)}"
        return result


# --- main -----------------------------------------------------------------------------------


def pin_plan(pin: bool) -> tuple[set[int], set[int]] | None:
    """With ``pin`` and 2+ usable CPUs: (the lowest for the generator, the rest for the
    servers); else None."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def phases(args: argparse.Namespace) -> list[Phase]:
    fast = {"ttft_s": 0.0, "token_interval_s": 0.0, "tokens": 2}
    stream = {
        "ttft_s": 0.0,
        "token_interval_s": args.token_interval_ms / 1000,
        "tokens": args.stream_tokens,
    }
    think_ms = 1000 * args.concurrency / args.paced_rate
    streams = [
        Phase(name, "stream", args.streams, args.duration, sim_timing=stream, path=path)
        for name, (path, _) in _report.STREAMS.items()
    ]
    return [
        Phase("saturated", "generate", args.concurrency, args.duration, sim_timing=fast),
        Phase("paced", "generate", args.concurrency, args.short_duration, think_ms, fast),
        Phase("unloaded", "generate", 1, args.short_duration, sim_timing=fast),
        *streams,
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
    p.add_argument(
        "--backend",
        choices=("fast", "sim"),
        default="fast",
        help="fast: bench/_fast_backend.py; sim: the simulators (python -m corral.sim)",
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
    p.add_argument("--backends", "--sims", type=int, default=2, help="backend processes")
    p.add_argument(
        "--max-concurrent",
        "--sim-parallel",
        type=int,
        default=64,
        help="corral's max_concurrent per backend (and the simulators' slots)",
    )
    p.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (direct: one per backend)")
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the generator on CPU 0, proxies and backends on the others (2+ CPUs)",
    )
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"of {', '.join(KNOWN_TARGETS)}")
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
    if not (1 <= args.backends <= 16 and args.paced_rate > 0):
        p.error("--backends must be 1-16 and --paced-rate positive")
    if not (1 <= args.wrk_threads <= 64 and 1 <= args.max_concurrent <= 4096):
        p.error("--wrk-threads must be 1-64 and --max-concurrent 1-4096")
    if not (1 <= args.stream_tokens <= 10_000 and 0 <= args.token_interval_ms <= 1000):
        p.error("--stream-tokens must be 1-10000 and --token-interval-ms 0-1000")
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(KNOWN_TARGETS))
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(KNOWN_TARGETS)}")
    return args


def run(args: argparse.Namespace, bench: Bench, wanted: list[str]) -> list[Target]:
    if args.generator != "aiohttp":
        bench.wrk = find_or_install("wrk", ["wrk"], args.install)
        if bench.wrk is None and args.generator == "wrk":
            raise RuntimeError("wrk unavailable")
    if bench.wrk:
        bench.versions["wrk"] = tool_version([bench.wrk, "-v"])
    if bench.cpus:
        gen, rest = bench.cpus
        log(f"pinned: generator on CPU {_cpu_list(gen)}, servers on CPU {_cpu_list(rest)}")
    bench.start_backends()
    if "nginx" in wanted:
        bench.start_nginx()
    if "corral" in wanted:
        bench.start_corral("corral", None)
    if "corral-quiet" in wanted:
        bench.start_corral("corral-quiet", "warning")
    if "corral-aiohttp" in wanted:
        bench.start_corral("corral-aiohttp", None, aiohttp=True)
    if "httpx" in wanted:
        bench.start_httpx()
    targets = bench.targets
    if "direct" not in wanted:
        log("direct is measured anyway: every ratio is against it")
    log(f"targets: {', '.join(t.name for t in targets)}; {args.rounds} round(s)")
    for phase in phases(args):
        bench.configure_sims(phase.sim_timing)
        for r, order in rotations(targets, args.rounds):
            for target in order:
                res = bench.measure(phase, target)
                target.results.setdefault(phase.name, []).append(res)
                log(f"[{phase.name:<11} {r + 1}] {target.name:<12} {_brief(res)}")
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
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
            "pinned": (
                {"generator": sorted(bench.cpus[0]), "servers": sorted(bench.cpus[1])}
                if bench.cpus
                else None
            ),
            **bench.versions,
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "phases": [vars(p) for p in phases(args)],
        "targets": {t.name: t.note for t in targets},
        "direct_vs_nginx": _report.direct_vs_nginx(med),
        "medians": med,
        "verdicts": ver,
        "rounds": {t.name: t.results for t in targets},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_report.finite(report), indent=2, allow_nan=False) + "\n")
    log(f"wrote {args.json}")
    return 0


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _brief(res: dict[str, Any]) -> str:
    if res["mode"] == "stream":
        text = (
            f"{res['chunks_per_s']:8,.0f} chunks/s  ttfb p50 {res['ttfb_p50_ms']:6.2f} ms"
            f"  answer p50 {res['answer_p50_ms']:7.1f} ms"
        )
    else:
        text = f"{res['rps']:8,.0f} req/s  p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms"
    cpu = res.get("cpu_us_per_request") or res.get("cpu_us_per_chunk")
    if cpu:
        text += f"  cpu {cpu:5.0f} µs"
    text += f"  cores: proxy {res['proxy_cores']:.2f} backends {res['backend_cores']:.2f}"
    if res.get("errors"):
        text += f"  errors {res['errors']} {res.get('error_kinds', '')}"
    return text


def _warnings(med: _report.Medians) -> None:
    ratio = _report.direct_vs_nginx(med)
    if math.isfinite(ratio) and ratio < _report.MIN_DIRECT_VS_NGINX:
        log(
            f"warning: direct served {ratio:.2f}× nginx's req/s (want ≥ "
            f"{_report.MIN_DIRECT_VS_NGINX:g}×): the backends or the generator, not only the "
            "proxies, may be what is measured (fewer cores than processes?)"
        )
    for name, phases_ in med.items():
        errors = sum(p.get("errors", 0) for p in phases_.values())
        if errors:
            log(f"warning: {name} had {int(errors)} failed requests")


if __name__ == "__main__":
    sys.exit(main())
