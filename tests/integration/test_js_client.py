"""The ollama package for JavaScript reads corral's merged pull stream to its end: it stops at
the first line that says ``"status": "success"`` and raises at the first ``error`` line, so only
the fleet's final line may say success and a backend's failure must reach it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import poll, require_tool

pytestmark = pytest.mark.integration

JS = Path(__file__).resolve().parents[1] / "js"


def pull_with_js(host: str, model: str) -> subprocess.Popen[str]:
    """Start tests/js/pull.mjs (read its output with :func:`parts`)."""
    node = require_tool("node", "the JavaScript client cannot run", "nodejs")
    if not (JS / "node_modules" / "ollama").is_dir():
        pytest.skip(
            "the ollama package for JavaScript is not installed in tests/js (scripts/test-deps.sh"
            " installs it with npm; the npm registry was not reachable)"
        )
    return subprocess.Popen(
        [node, str(JS / "pull.mjs"), host, model],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=JS,
    )


def parts(js: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Every part the JS client handed over, then how it ended."""
    out, err = js.communicate(timeout=60)
    assert js.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def fleet(sim_factory: Any, corral_factory: Any) -> Any:
    a, b = sim_factory(name="a"), sim_factory(name="b")
    corral = corral_factory([{"id": "a", "url": a.url}, {"id": "b", "url": b.url}])
    return corral, a, b


def test_the_js_client_reads_every_backends_progress(fleet: Any) -> None:
    """Both backends pull: the JS client sees each one's progress and finish line, and stops
    only at the fleet's success."""
    corral, _, _ = fleet
    got = parts(pull_with_js(corral.url, "gemma3:1b"))
    assert got[-1] == {"done": True}
    assert got[-2] == {"status": "success"}
    finished = [p["backend"] for p in got if p.get("status") == "backend finished"]
    assert sorted(finished) == ["a", "b"]
    assert {p.get("backend") for p in got[:-2]} == {"a", "b"}


def test_the_js_client_hears_of_a_later_backends_failure(fleet: Any) -> None:
    """a has pulled the model when b goes away mid-pull: the JS client raises with b's error
    instead of ending at a's finish."""
    corral, a, b = fleet
    b.config.pull_delay_s = 0.5  # b is slow; a is done in milliseconds
    js = pull_with_js(corral.url, "gemma3:1b")
    assert poll(lambda: a.app.sim.store.find("gemma3:1b") is not None, 10)
    b.stop()
    got = parts(js)
    assert {"backend": "a", "status": "backend finished"} in got
    assert "thrown" in got[-1], got
    assert got[-1]["thrown"].startswith("backend unreachable"), got[-1]
    assert {"status": "success"} not in got
