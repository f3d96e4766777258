"""The access log: one JSON line per request, the same however it is rendered."""

from __future__ import annotations

import json
import re
from typing import Any

import structlog

from corral.logs import AccessLog, _stamp


class Lines:
    """Stands in for the buffered stderr writer: keeps what was written."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def msg(self, message: str) -> None:
        self.lines.append(message)


FIELDS: dict[str, Any] = {
    "request_id": "abc",
    "route": "generate",
    "model": "llama3.2",
    "backend": "gpu0",
    "status": 200,
    "duration_s": 0.001,
    "ttft_s": 0.0005,
    "tokens": 16,
    "attempts": 1,
}


def test_the_direct_access_line_is_the_line_structlog_writes() -> None:
    """With JSON logs the access line skips structlog's chain, yet a log reader sees the same
    keys in the same order and the same values, and a timestamp of the same form."""
    direct = Lines()
    access = AccessLog()
    access._direct = direct  # type: ignore[assignment]
    access.request(dict(FIELDS))
    chain = [structlog.processors.add_log_level, _stamp, structlog.processors.JSONRenderer()]
    event: Any = {**FIELDS, "event": "request"}
    for processor in chain:
        event = processor(None, "info", event)
    ours, theirs = json.loads(direct.lines[0]), json.loads(event)
    assert list(ours) == list(theirs)
    assert {k: v for k, v in ours.items() if k != "timestamp"} == {
        k: v for k, v in theirs.items() if k != "timestamp"
    }
    reference = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "", {})
    form = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
    assert form.fullmatch(ours["timestamp"]), ours["timestamp"]
    assert form.fullmatch(reference["timestamp"]), reference["timestamp"]


def test_library_lines_are_json_in_a_json_log(capfd: Any) -> None:
    """With JSON logs, a line a library logs through the standard library (uvicorn's "Started
    server process", say) is a JSON object too, with its logger and level."""
    import logging

    from corral.logs import access_log, configure_logging

    configure_logging("info", "json")
    try:
        # (uvicorn's own logger may carry another test's handlers: a fresh name stands in)
        logging.getLogger("some.dependency").info("Started server process [%d]", 42)
        err = capfd.readouterr().err.strip().splitlines()
        line = json.loads(err[-1])
        assert line["event"] == "Started server process [42]"
        assert (line["logger"], line["level"]) == ("some.dependency", "info")
        assert line["timestamp"].endswith("Z")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
        access_log._direct = None
