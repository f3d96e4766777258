"""A page in a real browser calling corral, as browser apps call Ollama: from a loopback
origin its JSON POST (preflighted) is answered and readable; from a foreign origin the
browser gets nothing."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_ui import Browser

pytestmark = pytest.mark.integration

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>app</title><p>an app page"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def page_server() -> Iterator[int]:
    """A web app's own server on loopback: the page the browser opens."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def chat_from(browser: Browser, page: str, corral_url: str) -> str:
    """Open ``page`` and, from it, POST a chat to corral with fetch(); what the page read."""
    browser.goto(page)
    script = f"""
        fetch({json.dumps(corral_url + "/api/chat")}, {{
            method: "POST",
            headers: {{"Content-Type": "application/json"}},
            body: {json.dumps(json.dumps(CHAT))},
        }}).then(r => r.json()).then(j => "read: " + j.message.content)
          .catch(e => "blocked: " + e)
    """
    answer: str = browser.evaluate(script, await_promise=True)
    return answer


def test_a_loopback_page_reads_corrals_answer_and_a_foreign_one_cannot(
    sim_factory: Any, corral_factory: Any, page_server: int, tmp_path: Path
) -> None:
    sim = sim_factory(name="a")
    corral = corral_factory([{"id": "gpu0", "url": sim.url}])
    # app.test is a name that is not loopback, resolved to this machine for the browser only.
    flags = ("--host-resolver-rules=MAP app.test 127.0.0.1",)
    with Browser(tmp_path / "profile", flags) as browser:
        mine = chat_from(browser, f"http://localhost:{page_server}/", corral.url)
        assert mine.startswith("read: "), mine
        foreign = chat_from(browser, f"http://app.test:{page_server}/", corral.url)
        assert foreign.startswith("blocked: "), foreign
    assert sim.stats()["by_route"]["/api/chat"] == 1
