"""structlog set-up: JSON lines when not on a terminal, readable lines on one."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import json
import logging
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Info lines (one access line per request) are flushed in batches this often; warnings and
# errors at once. A write per request was a tenth of corral's CPU per proxied request.
FLUSH_EVERY_S = 0.2


class BufferedLogger:
    """A structlog logger writing to a buffered stream, flushed shortly after each burst."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._scheduled = False

    def _write(self, message: str, urgent: bool) -> None:
        with self._lock:
            self._stream.write(message + "\n")
            if urgent:
                self._stream.flush()
                return
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._stream.flush()  # no event loop to flush later: do it now
                return
            self._scheduled = True
        loop.call_later(FLUSH_EVERY_S, self.flush)

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()

    def msg(self, message: str) -> None:
        self._write(message, urgent=False)

    def urgent(self, message: str) -> None:
        self._write(message, urgent=True)

    debug = info = msg
    warning = warn = error = err = critical = exception = fatal = failure = urgent


class BufferedLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self.logger = BufferedLogger(stream)
        atexit.register(self.logger.flush)

    def __call__(self, *args: Any) -> BufferedLogger:
        return self.logger


def _buffered_stderr() -> TextIO:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stderr  # no real file (captured in tests): write through
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8", write_through=False)


class _Stamper:
    """``timestamp`` in ISO 8601 UTC with microseconds, as structlog's ``TimeStamper(fmt="iso",
    utc=True)`` writes it, with the date and time formatted once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event


_stamp = _Stamper()


class JsonFormatter(logging.Formatter):
    """A standard-library record as one JSON line shaped like corral's own: ``event``,
    ``logger``, ``level``, ``timestamp`` (and ``exception`` with its traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"event": record.getMessage(), "logger": record.name}
        line["level"] = record.levelname.lower()
        _stamp(None, "", line)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class AccessLog:
    """The access line, one per request.

    With JSON logs at level info or below, the line is rendered here in one ``json.dumps``,
    exactly as structlog's chain would render it (the fields, then ``event``, ``level``,
    ``timestamp``) and handed to the same buffered writer: the processor chain was a sixth
    of corral's CPU per proxied request. Otherwise (console logs, a higher level, logging
    not configured, as in tests) it goes through structlog.
    """

    def __init__(self) -> None:
        self._log = structlog.get_logger("corral.access")
        self._direct: BufferedLogger | None = None

    def request(self, fields: dict[str, Any]) -> None:
        """Write the access line of one request (``fields`` becomes the line: not reused)."""
        direct = self._direct
        if direct is None:
            self._log.info("request", **fields)
            return
        fields["event"] = "request"
        fields["level"] = "info"
        _stamp(None, "", fields)
        direct.msg(json.dumps(fields))


access_log = AccessLog()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger once for the process."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    numeric = logging.getLevelName(level.upper())
    factory = BufferedLoggerFactory(_buffered_stderr())
    access_log._direct = factory.logger if fmt == "json" and numeric <= logging.INFO else None
    # Every processor runs for each access line (one per request): the few that are needed,
    # in their cheapest form (no context variables are bound anywhere).
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries (uvicorn's start and stop lines, for one) log through the standard library:
    # in the same shape as corral's own lines, so that a JSON log stays JSON throughout.
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
