"""aiohttp's client vs corral.http1.Http1Pool: requests per second and client CPU per request.

corral opens one upstream request per proxied request. This measures only that client side,
against a backend fast enough not to matter much (``bench/_fast_backend.py`` in a subprocess):
in this process, on uvloop, ``--workers`` concurrent workers each send sequential POSTs
(a ~60-byte JSON body) for ``--duration`` seconds, with

- aiohttp: a ClientSession configured like corral's ``Upstream`` (``TCPConnector(limit=0)``,
  ``auto_decompress=False``, no User-Agent/Accept-Encoding, ``DummyCookieJar``, a per-request
  ``ClientTimeout(sock_connect, sock_read)`` and the idle read timeout set on the connection's
  protocol after the headers), the body read with ``resp.content.readany()``;
- http1: ``Http1Pool.open`` + ``read()`` until b"" + ``close()``.

Rounds interleave the two (order alternating) so drift hits both. Reported: medians over rounds
of req/s and CPU µs per request of this process (``time.process_time`` deltas / requests), and
the ratio. Two cases: a non-streaming ~300-byte JSON answer, and a stream of 32 NDJSON chunks
(each written separately by the backend, ``--interval-ms`` apart), where chunks/s and CPU µs
per chunk are reported too.

    .venv/bin/python bench/upstream_client.py [--duration 4 --rounds 3 --workers 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop

from corral.http1 import Http1Pool

BACKEND = Path(__file__).resolve().parent / "_fast_backend.py"
BODY = b'{"model":"llama3.2:latest","prompt":"hi","stream":false}'  # 56 bytes
STREAM_BODY = b'{"model":"llama3.2:latest","prompt":"hi","stream":true}'
CONNECT_S = 5.0
READ_S = 60.0
IDLE_S = 60.0


@dataclass
class Phase:
    requests: int = 0
    chunks: int = 0  # NDJSON lines received
    bytes: int = 0
    errors: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


@dataclass
class Results:
    phases: dict[tuple[str, str], list[Phase]] = field(default_factory=dict)

    def add(self, case: str, client: str, phase: Phase) -> None:
        self.phases.setdefault((case, client), []).append(phase)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_backend(port: int, tokens: int) -> subprocess.Popen[bytes]:
    if not BACKEND.exists():
        sys.exit(f"{BACKEND} is missing: it is the responder this benchmark runs against")
    args = [sys.executable, str(BACKEND), "--port", str(port), "--tokens", str(tokens)]
    proc = subprocess.Popen(
        [*args, "--token-interval-ms", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "fast backend on http://..." once it listens
    if b"fast backend on" not in line:
        proc.kill()
        sys.exit(f"backend failed to start: {line!r}")
    return proc


Worker = Callable[[float, Phase], Awaitable[None]]


def aiohttp_worker(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> Worker:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=CONNECT_S, sock_read=READ_S
    )

    async def run(deadline: float, phase: Phase) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            try:
                resp = await session.request(
                    "POST", url, headers=headers, data=body, timeout=timeout, allow_redirects=False
                )
                conn = resp.connection
                if conn is not None and conn.protocol is not None:
                    conn.protocol.read_timeout = IDLE_S  # as corral's Upstream.open does
                try:
                    content = resp.content
                    while chunk := await content.readany():
                        phase.bytes += len(chunk)
                        phase.chunks += chunk.count(b"\n")
                finally:
                    resp.close()
                if resp.status != 200:
                    phase.errors += 1
                phase.requests += 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                phase.errors += 1

    return run


def http1_worker(
    pool: Http1Pool, url: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> Worker:
    async def run(deadline: float, phase: Phase) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            try:
                resp = await pool.open(
                    "POST", url, headers, body, headers_timeout_s=READ_S, idle_timeout_s=IDLE_S
                )
                try:
                    while chunk := await resp.read():
                        phase.bytes += len(chunk)
                        phase.chunks += chunk.count(b"\n")
                finally:
                    resp.close()
                if resp.status != 200:
                    phase.errors += 1
                phase.requests += 1
            except Exception:  # every failure is counted and reported
                phase.errors += 1

    return run


async def run_phase(worker: Worker, workers: int, duration: float) -> Phase:
    phase = Phase()
    loop = asyncio.get_running_loop()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    deadline = loop.time() + duration
    await asyncio.gather(*(worker(deadline, phase) for _ in range(workers)))
    phase.wall_s = time.perf_counter() - wall0
    phase.cpu_s = time.process_time() - cpu0
    return phase


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def report(results: Results, args: argparse.Namespace) -> None:
    header = [
        "case",
        "client",
        "req/s",
        "CPU µs/req",
        "chunks/s",
        "CPU µs/chunk",
        "errors",
        "rounds req/s",
    ]
    rows: list[list[str]] = []
    med: dict[tuple[str, str], tuple[float, float, float, float]] = {}
    for (case, client), phases in results.phases.items():
        rps = [p.requests / p.wall_s for p in phases]
        cpu = [p.cpu_s / p.requests * 1e6 if p.requests else float("nan") for p in phases]
        cps = [p.chunks / p.wall_s for p in phases]
        cpc = [p.cpu_s / p.chunks * 1e6 if p.chunks else float("nan") for p in phases]
        m = (
            statistics.median(rps),
            statistics.median(cpu),
            statistics.median(cps),
            statistics.median(cpc),
        )
        med[(case, client)] = m
        rows.append(
            [
                case,
                client,
                f"{m[0]:,.0f}",
                f"{m[1]:.1f}",
                f"{m[2]:,.0f}" if case == "stream" else "-",
                f"{m[3]:.2f}" if case == "stream" else "-",
                str(sum(p.errors for p in phases)),
                " ".join(f"{r:,.0f}" for r in rps),
            ]
        )
    for case in dict.fromkeys(c for c, _ in results.phases):
        a, h = med.get((case, "aiohttp")), med.get((case, "http1"))
        if a and h:
            rows.append(
                [
                    case,
                    "http1/aiohttp",
                    f"{h[0] / a[0]:.2f}x",
                    f"{h[1] / a[1]:.2f}x",
                    f"{h[2] / a[2]:.2f}x" if case == "stream" else "-",
                    f"{h[3] / a[3]:.2f}x" if case == "stream" else "-",
                    "",
                    "",
                ]
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    print(
        f"{args.workers} workers, {args.duration:g}s x {args.rounds} interleaved rounds per "
        "client, "
        f"uvloop, Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, "
        f"{os.cpu_count()} CPUs (medians over rounds; CPU = this process)"
    )
    print(fmt_row(header, widths))
    print(fmt_row(["-" * w for w in widths], widths))
    for r in rows:
        print(fmt_row(r, widths))


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    proc = start_backend(port, args.tokens)
    try:
        await bench(args, port)
    finally:
        proc.terminate()
        proc.wait(5)


async def bench(args: argparse.Namespace, port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
        ),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    pool = Http1Pool(connect_timeout_s=CONNECT_S)
    ctype = "application/json"
    stream_headers = {
        "Content-Type": ctype,
        "X-Fast-Tokens": str(args.chunks - 1),  # + the final "done" line
        "X-Fast-Interval-Ms": str(args.interval_ms),
    }
    cases: dict[str, dict[str, Worker]] = {
        "plain": {
            "aiohttp": aiohttp_worker(
                session, base + "/api/generate", BODY, {"Content-Type": ctype}
            ),
            "http1": http1_worker(
                pool, base + "/api/generate", BODY, [(b"Content-Type", ctype.encode())]
            ),
        },
        "stream": {
            "aiohttp": aiohttp_worker(session, base + "/api/generate", STREAM_BODY, stream_headers),
            "http1": http1_worker(
                pool,
                base + "/api/generate",
                STREAM_BODY,
                [(k.encode(), v.encode()) for k, v in stream_headers.items()],
            ),
        },
    }
    results = Results()
    try:
        # Sanity: both see the same answer.
        for name, worker in cases["plain"].items():
            p = await run_phase(worker, 1, 0.05)
            print(
                f"check {name}: {p.requests} requests, "
                f"{p.bytes / max(p.requests, 1):.0f} B/answer, errors {p.errors}"
            )
        for case in args.cases:
            clients = cases[case]
            for worker in clients.values():  # warm up: connections, caches
                await run_phase(worker, args.workers, args.warmup)
            for rnd in range(args.rounds):
                order = list(clients) if rnd % 2 == 0 else list(reversed(clients))
                for name in order:
                    phase = await run_phase(clients[name], args.workers, args.duration)
                    results.add(case, name, phase)
                    print(
                        f"{case:6} round {rnd + 1} {name:7} "
                        f"{phase.requests / phase.wall_s:8,.0f} req/s "
                        f"{phase.cpu_s / max(phase.requests, 1) * 1e6:6.1f} µs CPU/req "
                        f"errors {phase.errors}",
                        flush=True,
                    )
    finally:
        await session.close()
        await pool.close()
    report(results, args)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=4.0, help="seconds per client per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=8, help="tokens in the plain answer (~300 B)")
    p.add_argument("--chunks", type=int, default=32, help="chunks per streamed answer")
    p.add_argument("--interval-ms", type=float, default=1.0, help="gap between streamed chunks")
    p.add_argument("--cases", nargs="+", default=["plain", "stream"], choices=["plain", "stream"])
    return p.parse_args()


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
