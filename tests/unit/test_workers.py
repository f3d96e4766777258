"""The parent of ``serve --workers`` speaks to systemd for its workers."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.workers import NotifyRelay, plans, private_dir


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The parent's own NOTIFY_SOCKET, non-blocking."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "systemd"))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "systemd"))
        yield sock


def heard(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


def test_ready_once_every_worker_is(tmp_path: Path, systemd: socket.socket) -> None:
    """READY=1 goes on once, when the last worker says it; a stranger's READY=1 counts for
    nothing; the first STOPPING=1 goes on, later ones do not."""
    relay = NotifyRelay(tmp_path / "notify")
    relay.expect([101, 102])
    relay.handle(b"READY=1", 101)
    relay.handle(b"READY=1", 999)
    relay.handle(b"READY=1", None)
    assert heard(systemd) == []
    relay.handle(b"READY=1\nSTATUS=serving", 102)
    relay.handle(b"READY=1", 102)
    assert heard(systemd) == [b"READY=1"]
    relay.handle(b"STOPPING=1", 101)
    relay.stopping()
    relay.handle(b"STOPPING=1", 102)
    assert heard(systemd) == [b"STOPPING=1"]
    relay.close()


def test_a_worker_replaced_before_ready_is_waited_for_in_its_place(
    tmp_path: Path, systemd: socket.socket
) -> None:
    """A worker that dies before it is ready is replaced: systemd hears READY=1 once the
    replacement and the others are ready (not never); after READY=1, replacements change
    nothing."""
    relay = NotifyRelay(tmp_path / "notify")
    relay.expect([101, 102])
    relay.handle(b"READY=1", 102)
    relay.replaced(101, 103)
    relay.handle(b"READY=1", 101)
    assert heard(systemd) == []
    relay.handle(b"READY=1", 103)
    assert heard(systemd) == [b"READY=1"]
    relay.replaced(102, 104)
    relay.handle(b"READY=1", 104)
    assert heard(systemd) == []
    relay.close()


def test_no_ready_after_stopping(tmp_path: Path, systemd: socket.socket) -> None:
    """Told to stop before every worker was ready: systemd hears STOPPING=1 only."""
    relay = NotifyRelay(tmp_path / "notify")
    relay.expect([101, 102])
    relay.handle(b"READY=1", 101)
    relay.stopping()
    relay.handle(b"READY=1", 102)
    assert heard(systemd) == [b"STOPPING=1"]
    relay.close()


def test_the_relay_reads_the_senders_pid(tmp_path: Path, systemd: socket.socket) -> None:
    """A datagram on the relay's socket is credited to the process that sent it."""
    relay = NotifyRelay(tmp_path / "notify")
    relay.expect([os.getpid()])
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as worker:
        worker.sendto(b"READY=1", relay.path)
    relay.receive()
    assert heard(systemd) == [b"READY=1"]
    relay.close()


def test_no_relay_outside_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET the parent makes no relay; the workers get none either."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert NotifyRelay.open(tmp_path) is None
    assert all(plan.notify_socket is None for plan in plans(tmp_path, 2, None))


def test_private_dir_is_the_users_alone_and_removed() -> None:
    """The directory of the workers' sockets is 0700 and gone afterwards."""
    with private_dir() as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        (path / "metrics-0.sock").touch()
    assert not path.exists()
