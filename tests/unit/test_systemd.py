"""sd_notify speaks systemd's notify protocol on $NOTIFY_SOCKET, and is silent elsewhere."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from corral.systemd import sd_notify


def test_ready_reaches_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """READY=1 arrives as one datagram on the socket systemd names."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") is True
        assert server.recv(64) == b"READY=1"


def test_abstract_socket_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET starting with @ is Linux's abstract namespace."""
    name = f"corral-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("STOPPING=1") is True
        assert server.recv(64) == b"STOPPING=1"


def test_outside_systemd_it_does_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No NOTIFY_SOCKET, or a dead one: False, no exception."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    assert sd_notify("READY=1") is False
