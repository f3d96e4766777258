"""structlog set-up: JSON lines when not on a terminal, readable lines on one."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import logging
import sys
import threading
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=BufferedLoggerFactory(_buffered_stderr()),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
