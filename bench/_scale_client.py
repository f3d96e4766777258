"""The scale benchmark's client (aiohttp on uvloop), run by scale.py as a few subprocesses.

Two modes, both starting at the wall-clock time ``--start-at`` so that several processes act
together; times in the output are wall-clock seconds since ``--zero`` (the parent's zero):

- ``streams``: open ``--streams`` streamed ``/api/generate`` requests at once (round robin over
  the ``--url``s) and read them to their end. For every NDJSON line it records when it arrived
  and how long after its ``created_at`` (the simulator's wall clock, in nanoseconds, taken
  just before the line is written): the line's delay from the simulator to this client.
  The (arrival, delay) pairs go to ``--out`` as float64s; stdout gets one JSON summary.
- ``paced``: send small non-streamed requests at ``--rate`` per second for ``--duration``
  seconds (open loop, each its own task) and report their latencies and the CPU seconds that
  the ``--proxy-pid`` process spent inside that window.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import itertools
import json
import sys
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from _cpu import total_cpu
from _open_loop import send_at
from _stats import summarize_latencies
from balance import _loop_run, _session

MODEL = "llama3.2"
HEADERS = {"Content-Type": "application/json"}
_CREATED = b'"created_at":"'
_seconds_of: dict[bytes, int] = {}


def created_ns(line: bytes) -> int | None:
    """The ``created_at`` of one Ollama NDJSON line as Unix nanoseconds; None without one.

    The simulator writes Go's RFC 3339 with nanoseconds, trailing zeros dropped (``...:05.1Z``);
    the seconds part repeats across lines, so its conversion is cached.
    """
    at = line.find(_CREATED)
    if at < 0:
        return None
    start = at + len(_CREATED)
    end = line.find(b"Z", start)
    if end < 0:
        return None
    stamp = line[start:end]
    whole, _, frac = stamp.partition(b".")
    secs = _seconds_of.get(whole)
    if secs is None:
        try:
            secs = calendar.timegm(time.strptime(whole.decode(), "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return None
        _seconds_of[whole] = secs
    return secs * 1_000_000_000 + int(frac[:9].ljust(9, b"0") or 0)


def split_lines(pending: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of ``pending + chunk`` and what remains after the last newline."""
    data = pending + chunk
    *lines, rest = data.split(b"\n")
    return [line for line in lines if line], rest


def stream_body(tokens: int) -> bytes:
    return json.dumps(
        {"model": MODEL, "prompt": "hi", "stream": True, "options": {"num_predict": tokens}}
    ).encode()


class Stream:
    """One held stream: when it was sent, first answered, ended, and how."""

    __slots__ = ("complete", "ended", "error", "first", "lines", "sent", "status")

    def __init__(self) -> None:
        self.sent = self.first = self.ended = 0.0
        self.status = 0
        self.lines = 0
        self.complete = False
        self.error = ""


async def _hold(
    session: aiohttp.ClientSession, url: str, body: bytes, zero: float, out: array[float]
) -> Stream:
    s = Stream()
    now_ns = time.time_ns
    s.sent = time.time() - zero
    pending = b""
    last = b""
    try:
        async with session.post(url, data=body, headers=HEADERS) as resp:
            s.status = resp.status
            async for chunk in resp.content.iter_any():
                arrived = now_ns()
                if not s.first:
                    s.first = arrived / 1e9 - zero
                lines, pending = split_lines(pending, chunk)
                for line in lines:
                    made = created_ns(line)
                    if made is not None:
                        out.append(arrived / 1e9 - zero)
                        out.append((arrived - made) / 1e6)
                    last = line
                s.lines += len(lines)
    except (aiohttp.ClientError, TimeoutError) as exc:
        s.error = type(exc).__name__
    s.ended = time.time() - zero
    s.complete = s.status == 200 and b'"done":true' in last
    if not s.error and not s.complete:
        s.error = f"status {s.status}" if s.status != 200 else "incomplete"
    return s


def summarize_streams(streams: list[Stream]) -> dict[str, Any]:
    """Counts, the moments every stream was open and the first one ended, TTFBs."""
    answered = [s for s in streams if s.first]
    errors = Counter(s.error for s in streams if s.error)
    return {
        "streams": len(streams),
        "answered": len(answered),
        "complete": sum(s.complete for s in streams),
        "lines": sum(s.lines for s in streams),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "first_sent_s": min((s.sent for s in streams), default=0.0),
        # Every stream had its first byte at last_first_s; none had ended before first_end_s.
        "last_first_s": max((s.first for s in answered), default=0.0),
        "first_end_s": min((s.ended for s in streams), default=0.0),
        "ttfb_s": [s.first - s.sent for s in answered],
    }


async def _streams(args: argparse.Namespace) -> dict[str, Any]:
    urls = itertools.cycle([u.rstrip("/") + "/api/generate" for u in args.url])
    body = stream_body(args.tokens)
    pairs: array[float] = array("d")
    async with _session(args.request_timeout) as session:
        await _until(args.start_at)
        tasks = [_hold(session, next(urls), body, args.zero, pairs) for _ in range(args.streams)]
        streams = await asyncio.gather(*tasks)
    return {**summarize_streams(list(streams)), "pairs": pairs}


async def _paced(args: argparse.Namespace) -> dict[str, Any]:
    urls = itertools.cycle([u.rstrip("/") + "/api/generate" for u in args.url])
    body = json.dumps(
        {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
    ).encode()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    perf = time.perf_counter

    async def one(session: aiohttp.ClientSession) -> None:
        t0 = perf()
        try:
            async with session.post(next(urls), data=body, headers=HEADERS) as resp:
                await resp.read()
                if resp.status != 200:
                    errors[f"status {resp.status}"] += 1
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
            return
        latencies.append(perf() - t0)

    async with _session(args.request_timeout) as session:
        await _until(args.start_at)
        cpu0, begin = total_cpu(args.proxy_pid), perf()
        times = (i / args.rate for i in range(round(args.rate * args.duration)))
        await send_at(((t, session) for t in times), one, begin, 10_000)
        window = perf() - begin
        cpu = total_cpu(args.proxy_pid) - cpu0
    summary = summarize_latencies(latencies)
    return {
        "requests": summary["count"],
        "window_s": window,
        "rps": summary["count"] / window if window > 0 else 0.0,
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "errors": errors.total(),
        "error_kinds": dict(errors.most_common(5)),
        "proxy_cpu_s": cpu,
    }


async def _until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("streams", "paced"), required=True)
    parser.add_argument("--url", action="append", required=True, help="base URL; repeat")
    parser.add_argument("--zero", type=float, required=True, help="wall time of the zero")
    parser.add_argument("--start-at", type=float, default=0.0, help="wall time to begin")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=100, help="per stream")
    parser.add_argument("--out", type=Path, help="streams: (arrival s, delay ms) pairs")
    parser.add_argument("--rate", type=float, default=100.0, help="paced: requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="paced: seconds")
    parser.add_argument("--proxy-pid", type=int, action="append", default=[])
    parser.add_argument("--request-timeout", type=float, default=120.0)
    args = parser.parse_args()
    if args.mode == "streams" and args.out is None:
        parser.error("--mode streams needs --out")
    run = _streams if args.mode == "streams" else _paced
    result = _loop_run(run(args))
    pairs = result.pop("pairs", None)
    if pairs is not None:
        args.out.write_bytes(pairs.tobytes())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
