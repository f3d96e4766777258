"""Closed-loop load generator (aiohttp on uvloop), run by overhead.py in its own process.

Two modes, each ``--concurrency`` workers that repeat requests until the deadline; only what
completes inside the measured window (after ``--warmup``) counts:

- ``generate``: POST /api/generate with ``"stream": false``; per-request latency, requests/s.
  With ``--think-ms`` each connection pauses (uniformly 0 to twice that) between requests.
- ``stream``: POST ``--path`` (``/api/chat``, the default: NDJSON; ``/v1/chat/completions``:
  server-sent events; ``/api/generate``: NDJSON) with ``"stream": true``, every stream the
  same body (one opening user message: many users who happen to send the same first message,
  not one conversation); per stream the time to the first body byte and to the end of the
  answer, chunks (NDJSON lines or SSE events) received per second, and the streams that ended
  without their last line (``"done":true`` or ``data: [DONE]``).

With several ``--url`` the requests go round robin over them (the "direct" target). Prints one
JSON object on stdout, with the CPU seconds that the ``--proxy-pid`` and ``--sim-pid``
processes spent inside the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
from _cpu import total_cpu
from _stats import rate, summarize_latencies

GENERATE = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": False}).encode()
OPENING = "Hi! Can you help me plan a three-day trip to Lisbon?"
STREAM_BODIES = {
    "/api/generate": {"model": "llama3.2", "prompt": OPENING, "stream": True},
    "/api/chat": {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": OPENING}],
        "stream": True,
    },
    "/v1/chat/completions": {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": OPENING}],
        "stream": True,
    },
}
HEADERS = {"Content-Type": "application/json"}


def stream_format(path: str) -> tuple[bytes, bytes]:
    """(what ends one chunk, what the last chunk holds) for the stream format of ``path``."""
    if path.startswith("/v1/"):
        return b"\n\n", b"data: [DONE]"
    return b"\n", b'"done":true'


class Window:
    """The measured interval: [start + warmup, start + warmup + duration]."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        now = time.perf_counter()
        self.begin = now + warmup_s
        self.end = self.begin + duration_s
        self.duration_s = duration_s


async def _generate_worker(
    session: aiohttp.ClientSession,
    urls: itertools.cycle[str],
    win: Window,
    latencies: list[float],
    errors: Counter[str],
    think_s: float,
) -> None:
    perf = time.perf_counter
    while True:
        if think_s:
            # Paced runs: think time after each response, random around the mean.
            await asyncio.sleep(random.uniform(0, 2 * think_s))
        t0 = perf()
        if t0 >= win.end:
            return
        try:
            async with session.post(next(urls), data=GENERATE, headers=HEADERS) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
            continue
        t1 = perf()
        if t0 >= win.begin and t1 <= win.end:
            if status == 200:
                latencies.append(t1 - t0)
            else:
                errors[f"status {status}"] += 1


async def _stream_worker(
    session: aiohttp.ClientSession,
    urls: itertools.cycle[str],
    body: bytes,
    fmt: tuple[bytes, bytes],
    win: Window,
    times: dict[str, list[float]],
    counters: dict[str, int],
    errors: Counter[str],
) -> None:
    perf = time.perf_counter
    sep, final = fmt
    keep = len(final) + 16
    overlap = len(sep) - 1  # an SSE separator may arrive split over two reads
    while True:
        t0 = perf()
        if t0 >= win.end:
            return
        measured = t0 >= win.begin
        first: float | None = None
        last = b""
        try:
            async with session.post(next(urls), data=body, headers=HEADERS) as resp:
                if resp.status != 200:
                    await resp.read()
                    if measured:
                        errors[f"status {resp.status}"] += 1
                    continue
                async for chunk in resp.content.iter_any():
                    now = perf()
                    if first is None:
                        first = now
                    if win.begin <= now <= win.end:
                        head = last[-overlap:] if overlap else b""
                        counters["chunks"] += (head + chunk).count(sep)
                        counters["bytes"] += len(chunk)
                    # The final line may arrive split over two chunks.
                    last = last[-keep:] + chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            if measured:
                errors[type(exc).__name__] += 1
            continue
        done = perf()
        if measured and first is not None and first <= win.end:
            times["ttfb"].append(first - t0)
            counters["streams"] += 1
            if final not in last:
                counters["incomplete"] += 1
            elif done <= win.end:
                times["answer"].append(done - t0)


async def _sample_cpu(args: argparse.Namespace, win: Window, out: dict[str, float]) -> None:
    """CPU of the proxy and simulator processes at the window's two edges."""
    await asyncio.sleep(max(0.0, win.begin - time.perf_counter()))
    proxy0, sims0 = total_cpu(args.proxy_pid), total_cpu(args.sim_pid)
    await asyncio.sleep(max(0.0, win.end - time.perf_counter()))
    out["proxy_cpu_s"] = total_cpu(args.proxy_pid) - proxy0
    out["sim_cpu_s"] = total_cpu(args.sim_pid) - sims0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    path = "/api/generate" if args.mode == "generate" else args.path
    urls = itertools.cycle([u.rstrip("/") + path for u in args.url])
    connector = aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    errors: Counter[str] = Counter()
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        win = Window(args.warmup, args.duration)
        bound = args.warmup + args.duration + args.request_timeout + 5
        cpu: dict[str, float] = {}
        sampler = asyncio.ensure_future(_sample_cpu(args, win, cpu))
        if args.mode == "generate":
            latencies: list[float] = []
            workers = [
                _generate_worker(session, urls, win, latencies, errors, args.think_ms / 1000)
                for _ in range(args.concurrency)
            ]
            await asyncio.wait_for(asyncio.gather(*workers), bound)
            await sampler
            summary = summarize_latencies(latencies)
            return {
                **cpu,
                "mode": "generate",
                "requests": summary["count"],
                "rps": rate(summary["count"], win.duration_s),
                "p50_ms": summary["p50_ms"],
                "p99_ms": summary["p99_ms"],
                "mean_ms": summary["mean_ms"],
                "errors": errors.total(),
                "error_kinds": dict(errors.most_common(5)),
            }
        times: dict[str, list[float]] = {"ttfb": [], "answer": []}
        counters = {"chunks": 0, "bytes": 0, "streams": 0, "incomplete": 0}
        body = json.dumps(STREAM_BODIES[args.path]).encode()
        fmt = stream_format(args.path)
        workers = [
            _stream_worker(session, urls, body, fmt, win, times, counters, errors)
            for _ in range(args.concurrency)
        ]
        await asyncio.wait_for(asyncio.gather(*workers), bound)
        await sampler
        ttfb = summarize_latencies(times["ttfb"])
        answer = summarize_latencies(times["answer"])
        return {
            **cpu,
            "mode": "stream",
            "path": args.path,
            "streams": counters["streams"],
            "chunks": counters["chunks"],
            "chunks_per_s": rate(counters["chunks"], win.duration_s),
            "bytes_per_s": rate(counters["bytes"], win.duration_s),
            "ttfb_p50_ms": ttfb["p50_ms"],
            "ttfb_p99_ms": ttfb["p99_ms"],
            "answer_p50_ms": answer["p50_ms"],
            "answer_p99_ms": answer["p99_ms"],
            "answers": answer["count"],
            "incomplete": counters["incomplete"],
            "errors": errors.total() + counters["incomplete"],
            "error_kinds": dict(errors.most_common(5)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("generate", "stream"), required=True)
    parser.add_argument("--url", action="append", required=True, help="base URL; repeat")
    parser.add_argument("--path", choices=sorted(STREAM_BODIES), default="/api/chat")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--think-ms", type=float, default=0.0, help="mean pause per connection")
    parser.add_argument("--proxy-pid", type=int, action="append", default=[])
    parser.add_argument("--sim-pid", type=int, action="append", default=[])
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
