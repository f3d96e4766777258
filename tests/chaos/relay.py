"""A TCP relay between corral and a simulator that can fail the way networks do: a black hole
(connection attempts unanswered) or a connection lost in the middle of a line."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class Relay:
    """A TCP relay on 127.0.0.1 to ``target_port`` that can turn into a black hole: connection
    attempts then go unanswered (their SYNs dropped), as for a host that left the network or
    sits behind a firewall that drops packets, so ``connect()`` times out instead of failing."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stuffing: list[socket.socket] = []
        # Cut streamed answers at this many bytes into their third line or event (None: never).
        self.cut_streams_at: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, backlog: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(backlog)
        self.port = sock.getsockname()[1]
        return sock

    def start(self) -> Relay:
        """Relay every connection to the target."""
        self._listener = self._listen(128)
        self._stop.clear()
        self._acceptor = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        self._acceptor.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([listener], [], [], 0.02)
            if not ready:
                continue
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns |= {client, upstream}
            response = bytearray()  # the answer to the current request, as relayed so far
            for src, dst, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump, args=(src, dst, response, answers), daemon=True
                ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, response: bytearray, answers: bool
    ) -> None:
        """Copy ``src`` to ``dst`` (``answers``: the backend's side) until either ends."""
        try:
            while data := src.recv(65536):
                if not answers:
                    response.clear()  # a new request: its answer starts now
                elif self.cut_streams_at is not None:
                    relayed = len(response)
                    response += data
                    cut = _third_stream_line(response)
                    if cut is not None:
                        # Part of a line, then the connection ends: a network failure, not a
                        # server that tidily stops between two lines.
                        dst.sendall(
                            bytes(response[relayed : max(relayed, cut + self.cut_streams_at)])
                        )
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Either side ending ends both; each socket is closed by the pump reading it.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
            src.close()

    def _halt(self) -> None:
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for sock in self._stuffing:
            sock.close()
        self._stuffing = []

    def blackhole(self) -> None:
        """Cut the open connections and stop answering new ones."""
        self._halt()
        # A listen queue of one, filled and never accepted: the kernel drops further SYNs.
        self._listener = self._listen(0)
        for _ in range(2):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))
            self._stuffing.append(sock)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                probe.connect(("127.0.0.1", self.port))
                raise AssertionError("the black hole still accepts connections")

    def restore(self) -> None:
        """Relay again (on the same port)."""
        self._halt()
        self.start()

    def stop(self) -> None:
        self._halt()


_STREAM_MARKS = (b'"done":false', b'"object":"chat.completion.chunk"')


def _third_stream_line(data: bytearray) -> int | None:
    """Where the third line of a native stream or event of an OpenAI stream starts, if seen."""
    for mark in _STREAM_MARKS:
        at = -1
        for _ in range(3):
            at = data.find(mark, at + 1)
            if at < 0:
                break
        else:
            return data.rfind(b"\n", 0, at) + 1
    return None
