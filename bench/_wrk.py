"""wrk as the non-streaming load generator: far cheaper per request than a Python client, which
matters when the generator shares two cores with the proxy and the simulators.

One wrk process, one thread per backend for every target (so every target meets the same
generator): for ``direct`` the Lua ``setup()`` points each thread at its own simulator, for a
proxy all threads connect to the proxy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from _procs import preexec

# ``delay()`` (paced runs only) is wrk's per-connection think time after each response; random
# around the mean so that the connections do not march in lockstep.
SCRIPT = """\
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
local addrs = {%(addrs)s}
local n = 0
function setup(thread)
  if #addrs > 0 then
    thread.addr = wrk.lookup(addrs[(n %% #addrs) + 1][1], addrs[(n %% #addrs) + 1][2])[1]
  end
  n = n + 1
end
%(delay)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
DELAY = "function delay() return math.random(0, %d) end"


def script_text(body: str, think_ms: float, hosts: list[tuple[str, int]]) -> str:
    """The Lua script: POST ``body``; threads spread over ``hosts`` (empty: the URL's host);
    a random think time around ``think_ms`` between requests (0: back to back)."""
    delay = DELAY % round(2 * think_ms) if think_ms > 0 else ""
    addrs = ", ".join(f'{{"{h}", "{p}"}}' for h, p in hosts)
    return SCRIPT % {"body": body, "delay": delay, "addrs": addrs}


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition("/")[0].rpartition(":")
    return host, int(port)


def run(
    wrk: str,
    workdir: Path,
    urls: list[str],
    path: str,
    body: str,
    *,
    threads: int,
    conns: int,
    seconds: int,
    think_ms: float = 0.0,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    """One wrk run: requests, req/s, p50/p99 (ms), errors. Several ``urls``: thread i
    connects to ``urls[i % len(urls)]`` (so one thread uses only the first). ``cpus``: run
    wrk on those CPUs only."""
    threads = max(1, min(threads, conns))
    hosts = [host_port(u) for u in urls] if len(urls) > 1 else []
    script = workdir / f"wrk-{len(hosts)}-{round(think_ms)}.lua"
    script.write_text(script_text(body, think_ms, hosts))
    argv = [wrk, f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s"]
    proc = subprocess.Popen(
        [*argv, "-s", str(script), urls[0] + path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=preexec(cpus),
    )
    try:
        out, err = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    lines = [x for x in out.decode().splitlines() if x.startswith("WRKJSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed: {err.decode(errors='replace')[-500:]}")
    return summarize(json.loads(lines[-1].removeprefix("WRKJSON ")))


def summarize(o: dict[str, Any]) -> dict[str, Any]:
    """wrk's report (latencies in µs) as a result row (ms)."""
    span_s = o["duration_us"] / 1e6
    return {
        "mode": "generate",
        "requests": o["requests"],
        "rps": o["requests"] / span_s if span_s else 0.0,
        "p50_ms": o["p50_us"] / 1000,
        "p99_ms": o["p99_us"] / 1000,
        "max_ms": o["max_us"] / 1000,
        "errors": sum(o[k] for k in ("connect", "read", "write", "status", "timeout")),
    }
