"""The status page at /ui, rendered by a real headless Chromium over a real corral.

Chromium runs as a subprocess and is driven over the DevTools protocol (a websocket, with
the ``websockets`` package uvicorn[standard] already brings): the tests read the live page's
DOM while it refreshes itself from the admin API, type the admin key into its prompt, and
take a screenshot, which they decode and check.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import signal
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from corral.sim.config import GIB
from tests.helpers import poll, require_tool

pytestmark = pytest.mark.integration

WIDTH, HEIGHT = 1280, 900
UP_GREEN = (0x1F, 0x9D, 0x55)  # --up in index.html: the "up" state badges
HEADER_INK = (0x1D, 0x23, 0x30)  # --ink: the header bar
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-crash-reporter",
    f"--window-size={WIDTH},{HEIGHT}",
    "--remote-debugging-port=0",
)
# The page's state, read in one go: what a user sees, by the page's stable ids.
SNAPSHOT_JS = """(() => {
  const text = (id) => document.getElementById(id).textContent;
  const cells = (tr) => Object.fromEntries(
    [...tr.querySelectorAll("td[data-col]")].map((td) => [td.dataset.col, td.textContent]));
  return {
    state: document.body.dataset.state,
    strategy: text("strategy"),
    total: text("total-requests"),
    rate: text("request-rate"),
    healthy: text("backends-healthy") + "/" + text("backends-total"),
    dashboard: !document.getElementById("dashboard").hidden,
    prompt: !document.getElementById("key-prompt").hidden,
    key_input: document.getElementById("key-input").type,
    key_wrong: !document.getElementById("key-wrong").hidden,
    backends: [...document.querySelectorAll("tr[data-backend]")].map(
      (tr) => ({...cells(tr), backend: tr.dataset.backend, badge: tr.dataset.state})),
    gpus: [...document.querySelectorAll("tr[data-gpu]")].map(cells),
  };
})()"""


def chromium() -> str:
    return require_tool("chromium", "the status page cannot be rendered", "chromium")


class Browser:
    """Headless Chromium with one tab, driven over the DevTools protocol."""

    def __init__(self, profile: Path, extra_flags: tuple[str, ...] = ()) -> None:
        self.profile = profile
        self._log = (profile.parent / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [chromium(), *FLAGS, *extra_flags, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its helpers share one process group, ended as one
        )
        self._ids = itertools.count(1)
        self._stack = contextlib.ExitStack()
        self.ws: ClientConnection | None = None
        self.session = ""

    def __enter__(self) -> Browser:
        try:
            self._attach()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attach(self) -> None:
        # With port 0, Chromium picks a free port and writes it (and the browser's websocket
        # path) to DevToolsActivePort in the profile.
        active = self.profile / "DevToolsActivePort"

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}):\n{self.log()}")
            return len(active.read_text().split()) == 2 if active.exists() else False

        assert poll(ready, 30), f"chromium did not open its DevTools port:\n{self.log()}"
        port, path = active.read_text().split()
        self.ws = self._stack.enter_context(
            connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10)
        )
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        attached = self.send("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def log(self) -> str:
        self._log.flush()
        text = (self.profile.parent / "chromium.log").read_text(errors="replace")
        return "\n".join(line for line in text.splitlines() if "dbus" not in line)[-3000:]

    def send(self, method: str, timeout_s: float = 20, **params: Any) -> dict[str, Any]:
        """One DevTools command (on the tab once attached); its result. Events are skipped."""
        assert self.ws is not None
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        assert poll(lambda: self.evaluate("document.readyState") == "complete", 10)

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        result = self.send(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=await_promise,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = self.evaluate(SNAPSHOT_JS)
        return snap

    def wait_for(self, check: Any, timeout_s: float = 10) -> dict[str, Any]:
        """Poll the page until ``check(snapshot)`` holds; the last snapshot."""
        snaps: list[dict[str, Any]] = []

        def holds() -> bool:
            snaps.append(self.snapshot())
            return bool(check(snaps[-1]))

        assert poll(holds, timeout_s, 0.05), f"the page never got there; it shows {snaps[-1]}"
        return snaps[-1]

    def submit_key(self, key: str) -> None:
        self.evaluate(
            f'document.getElementById("key-input").value = {json.dumps(key)};'
            'document.getElementById("key-form").requestSubmit();'
        )

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self._stack.close()
        self.ws = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):  # helpers left in its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


class Load:
    """Threads sending generate requests through corral until the block ends."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.sent = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        body = {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                resp = client.post("/api/generate", json=body)
                with self._lock:
                    self.sent += 1
                    if resp.status_code != 200:
                        self.failures.append(f"{resp.status_code} {resp.text}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


# The demo's two simulated GPUs: backend id -> (max_concurrent, simulator settings).
DEMO_GPUS: dict[str, tuple[int, dict[str, Any]]] = {
    "gpu0": (
        4,
        {
            "name": "gpu0-fast",
            "vram_bytes": 80 * GIB,
            "gpu_name": "Simulated H100 80GB",
            "ttft_s": 0.02,
            "token_interval_s": 0.01,
        },
    ),
    "gpu1": (
        2,
        {
            "name": "gpu1-slow",
            "vram_bytes": 24 * GIB,
            "gpu_name": "Simulated L4 24GB",
            "ttft_s": 0.1,
            "token_interval_s": 0.03,
        },
    ),
}


def demo_corral(sim_factory: Any, corral_factory: Any, **sections: Any) -> Any:
    """corral over the demo's fast 80 GB and slow 24 GB simulated GPUs, their stats read from
    each simulator's DCGM page."""
    backends = []
    for backend_id, (slots, sim_settings) in DEMO_GPUS.items():
        sim = sim_factory(tokens=12, **sim_settings)
        backends.append(
            {
                "id": backend_id,
                "url": sim.url,
                "max_concurrent": slots,
                "gpu_metrics_url": f"{sim.url}/_sim/dcgm",
            }
        )
    return corral_factory(backends, gpu={"poll_s": 0.2}, **sections)


def count(text: str) -> int:
    return int(text.replace(",", ""))


def png_pixels(data: bytes) -> tuple[int, int, Counter[bytes]]:
    """Width, height and colour counts of an 8-bit RGB/RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    header: tuple[int, ...] = ()
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
    width, height, depth, colour, _, _, interlace = header
    assert (depth, interlace, colour in (2, 6)) == (8, 0, True), f"unexpected PNG {header}"
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    prev = bytearray(stride)
    colours: Counter[bytes] = Counter()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:  # Up
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:  # Average
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        colours.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp))
        prev = line
    return width, height, colours


def test_status_page_is_one_static_uncached_file(sim_factory: Any, corral_factory: Any) -> None:
    """/ui answers the page without a key, uncached, loading nothing from elsewhere; /ui/
    redirects to it."""
    corral = demo_corral(sim_factory, corral_factory)
    with corral.client() as client:
        resp = client.get("/ui")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/html")
        assert resp.headers["cache-control"] == "no-store"
        assert "default-src 'none'" in resp.headers["content-security-policy"]
        assert not re.search(r"(src|href)=\"(https?:)?//|@import|url\(", resp.text)
        slash = client.get("/ui/")
        assert slash.status_code == 308
        assert client.get("/ui/", follow_redirects=True).text == resp.text


def test_status_page_shows_backends_gpus_and_a_rising_counter(
    sim_factory: Any, corral_factory: Any, tmp_path: Path
) -> None:
    """In Chromium the page lists both backends up with their GPUs and the strategy, and its
    total-requests counter rises on its own while load runs; the screenshot shows it."""
    corral = demo_corral(sim_factory, corral_factory, balancer={"strategy": "round_robin"})
    with Browser(tmp_path / "profile") as browser:
        browser.goto(f"{corral.url}/ui")
        snap = browser.wait_for(
            lambda s: len(s["gpus"]) == 2 and all(b["gpu"] != "–" for b in s["backends"])
        )
        assert snap["state"] == "ok"
        assert snap["strategy"] == "round_robin"
        assert snap["healthy"] == "2/2"
        rows = {b["backend"]: b for b in snap["backends"]}
        assert set(rows) == {"gpu0", "gpu1"}
        assert {(b["badge"], b["state"]) for b in rows.values()} == {("up", "up")}
        assert rows["gpu0"]["id"].startswith("gpu0 http://127.0.0.1:")
        assert rows["gpu0"]["gpu"] == "Simulated H100 80GB"
        assert rows["gpu1"]["gpu"] == "Simulated L4 24GB"
        assert rows["gpu1"]["in-flight"].startswith("0/2")
        assert rows["gpu0"]["vram"].endswith("/80.0 GiB")
        assert {g["backends"] for g in snap["gpus"]} == {"gpu0", "gpu1"}
        before = count(snap["total"])

        with Load(corral.url) as load:
            assert poll(lambda: load.sent >= 20, 30)
            busy = browser.wait_for(
                lambda s: count(s["total"]) >= before + 20 and float(s["rate"]) > 0
            )
            png = browser.screenshot()
        assert not load.failures
        assert count(busy["total"]) > before
        assert sum(count(b["total"]) for b in busy["backends"]) == count(busy["total"])

    (tmp_path / "status-page.png").write_bytes(png)
    width, height, colours = png_pixels(png)
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    assert colours[bytes(HEADER_INK)] > WIDTH * 30, "no header bar"
    assert colours[bytes(UP_GREEN)] > 2 * 400, "no green 'up' badges for the two backends"


def test_status_page_asks_for_the_admin_key(
    sim_factory: Any, corral_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an admin key set the page shows a password prompt and no backends; a wrong key
    is refused, the right one shows the backends."""
    monkeypatch.setenv("CORRAL_ADMIN_KEY", "s3cret-admin")
    corral = demo_corral(sim_factory, corral_factory)
    with Browser(tmp_path / "profile") as browser:
        browser.goto(f"{corral.url}/ui")
        snap = browser.wait_for(lambda s: s["state"] == "key")
        assert snap["prompt"]
        assert snap["key_input"] == "password"
        assert not snap["dashboard"]
        assert snap["backends"] == []
        _, _, colours = png_pixels(browser.screenshot())
        assert colours[bytes(UP_GREEN)] == 0

        browser.submit_key("wrong")
        snap = browser.wait_for(lambda s: s["key_wrong"])
        assert snap["state"] == "key"
        assert snap["backends"] == []

        browser.submit_key("s3cret-admin")
        snap = browser.wait_for(lambda s: s["state"] == "ok" and len(s["backends"]) == 2)
        assert not snap["prompt"]
        assert {b["backend"] for b in snap["backends"]} == {"gpu0", "gpu1"}
