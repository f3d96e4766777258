"""The HTTP/1.1 listener at the edge: uvicorn's httptools protocol with nginx's limits.

uvicorn runs no timer before a connection's first request, caps neither connections nor
request heads, and httptools joins a header split over many reads by ``bytes +=`` (quadratic).
:class:`EdgeProtocol` adds, per connection and for about half a microsecond of CPU per request
(measured in-process against uvicorn's own protocol):

- a header read timeout (``server.header_timeout_s``, nginx's ``client_header_timeout``): from
  the connection's start, and from a request's first byte on a kept-alive connection, the
  request line and headers must arrive within it; else 408 and close (just close when nothing
  came at all);
- the idle timeout of a kept-alive connection is uvicorn's own ``timeout_keep_alive``
  (``server.idle_timeout_s``, set in :mod:`corral.server`);
- a cap on a request head (``server.max_header_bytes``: request line and header lines in all)
  and on its header count (``server.max_headers``): 431 and close, checked before the bytes
  are parsed, so a 16 MB header costs the first 64 KB and no more is read;
- one :class:`ConnectionGate` for the process: past ``server.max_connections`` (or the share
  of the descriptor limit that leaves descriptors for backends) a new connection is answered
  503 + ``Retry-After: 1`` at once and closed; counted per refusal, logged once per episode.
  The admin listener shares the gate, plus :data:`ADMIN_HEADROOM` connections of its own.

The timer for a request head is armed only when a head is still incomplete after a read, so
the usual request (head in one read) adds no timer to uvicorn's keep-alive one.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any, ClassVar

import httptools
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from corral.metrics import Metrics

__all__ = ["ADMIN_HEADROOM", "ConnectionGate", "EdgeLimits", "EdgeProtocol", "edge_protocol"]

log = structlog.get_logger("corral")

# Descriptors kept for everything but client connections (backends, state file, NVML...),
# and client connections get at most half of the rest: (soft limit - 64) // 2.
_FD_RESERVE = 64
# Connections the admin listener may open past the cap, so an operator still reaches /metrics
# and the admin API while the main port is full. Taken out of the descriptor share.
ADMIN_HEADROOM = 8


def _answer(status: bytes, body: bytes, *extra: bytes) -> bytes:
    head = [
        b"HTTP/1.1 " + status,
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        *extra,
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_TOO_MANY_CONNECTIONS = _answer(
    b"503 Service Unavailable", b'{"error": "too many connections"}', b"retry-after: 1"
)
_HEAD_TIMEOUT = _answer(b"408 Request Timeout", b'{"error": "request header timeout"}')
_HEAD_TOO_LARGE = _answer(
    b"431 Request Header Fields Too Large", b'{"error": "request header fields too large"}'
)


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE of this process."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ConnectionGate:
    """Open client connections across corral's listeners, and the cap on them.

    The cap is ``max_connections``, lowered to the share of the descriptor limit that leaves
    :data:`_FD_RESERVE` and as many again for backends; ``headroom`` more are the admin
    listener's alone. A refusal is counted each time and logged once per episode: the episode
    ends once open connections fall a tenth below the cap.
    """

    def __init__(
        self,
        max_connections: int,
        metrics: Metrics,
        *,
        headroom: int = 0,
        nofile: int | None = None,
    ) -> None:
        nofile = descriptor_limit() if nofile is None else nofile
        share = (nofile - _FD_RESERVE) // 2 - headroom
        self.metrics = metrics
        self.configured = max_connections
        self.cap = max(1, min(max_connections, share))
        self.headroom = headroom
        self.nofile = nofile
        self.open = 0
        self._refused = metrics.edge_refusals.labels(reason="max_connections")
        self._refused_in_episode = 0
        self._calm_below = self.cap - max(1, self.cap // 10)
        metrics.open_connections.set_function(lambda: self.open)

    def admit(self, extra: int) -> bool:
        """Count one more open connection if fewer than the cap (+ ``extra``) are open."""
        if self.open < self.cap + extra:
            self.open += 1
            return True
        self._refused.inc()
        if self._refused_in_episode == 0:
            log.warning(
                "connection cap reached: new connections get 503",
                max_connections=self.cap,
                open_connections=self.open,
            )
        self._refused_in_episode += 1
        return False

    def release(self) -> None:
        self.open -= 1
        if self._refused_in_episode and self.open < self._calm_below:
            log.info(
                "below the connection cap again",
                max_connections=self.cap,
                refused=self._refused_in_episode,
            )
            self._refused_in_episode = 0


class EdgeLimits:
    """One listener's limits: the shared gate, and the settings its connections read."""

    def __init__(
        self,
        gate: ConnectionGate,
        *,
        header_timeout_s: float,
        max_header_bytes: int,
        max_headers: int,
        headroom: int = 0,
    ) -> None:
        self.gate = gate
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.headroom = headroom
        refusals = gate.metrics.edge_refusals
        self.header_timeouts = refusals.labels(reason="header_timeout")
        self.refusals = {
            reason: refusals.labels(reason=reason)
            for reason in ("headers_too_large", "too_many_headers")
        }


class _HeadRefusedError(Exception):
    """Raised from a parser callback to stop parsing a request head past a cap."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_base = HttpToolsProtocol  # its callbacks called directly: no super() on the request path


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the edge's timeouts and caps (module docstring).

    uvicorn's keep-alive timer (the idle timeout) is cancelled when the next request begins,
    not when any byte arrives, so empty lines between requests do not keep a connection.
    """

    limits: ClassVar[EdgeLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.limits
        self._max_headers = limits.max_headers
        self._head_room = limits.max_header_bytes  # bytes the current head may still take
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # a request's first byte is parsed, its headers not all yet
        self._in_body = False  # headers parsed, the request's end not yet
        self._admitted = False

    # Connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        if not limits.gate.admit(limits.headroom):
            self._head_room = 0  # anything read now is refused unparsed
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._admitted = True
        self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.limits.gate.release()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            room = self._head_room
            if len(data) > room:
                self._past_head_room(data, room)
                return
            self._head_room = room - len(data)
        # uvicorn's data_received, with a cap's refusal told apart from a malformed request.
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadRefusedError):
                self._refuse_head(exc.__context__.reason)
            else:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def _past_head_room(self, data: bytes, room: int) -> None:
        # The head would pass the cap within this read: parse only up to the cap. A head that
        # ends inside resets the room (on_headers_complete); the rest is fed after it.
        self.data_received(data[:room])  # leaves the room at 0 unless the head ended
        if self.transport.is_closing():
            return
        if self._head_room == 0:
            self._refuse_head("headers_too_large")
            return
        self.data_received(data[room:])

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    # Parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        _base.on_message_begin(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's on_header (inlined: it runs for every header), with the count's cap.
        headers = self.headers
        if len(headers) >= self._max_headers:
            raise _HeadRefusedError("too_many_headers")
        name = name.lower()
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._head_room = self.limits.max_header_bytes
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        _base.on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._in_body = False
        _base.on_message_complete(self)

    # Refusals ------------------------------------------------------------------------------

    def _in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse_head(self, reason: str) -> None:
        self.limits.refusals[reason].inc()
        if not self._in_flight():
            self.transport.write(_HEAD_TOO_LARGE)
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_flight():
            # A pipelined head waits behind a response still being sent: its clock restarts.
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )
            return
        self.limits.header_timeouts.inc()
        if self._in_head:
            self.transport.write(_HEAD_TIMEOUT)
        self.transport.close()


def edge_protocol(limits: EdgeLimits) -> type[EdgeProtocol]:
    """An :class:`EdgeProtocol` class bound to one listener's ``limits`` (for ``http=``)."""
    return type("CorralListener", (EdgeProtocol,), {"limits": limits})
