"""The proxy tier behind the upstream seam: a scripted FakeTransport, and no sockets at all."""

from __future__ import annotations

import pytest

from tests.helpers import forbid_sockets


@pytest.fixture(autouse=True)
def _no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_sockets(monkeypatch)
