"""The state file: what a restarted corral takes back from it, and what it does with a file
it cannot use (never overwrite it unseen)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.fleet.gpu.sampler import NullSampler
from corral.runtime import Runtime
from tests.helpers import offline_settings


def start(state: Path) -> Runtime:
    return Runtime(
        offline_settings("a", server={"state_file": str(state)}), gpu_sampler=NullSampler()
    )


def register(rt: Runtime) -> None:
    from corral.config import RegisteredBackend
    from corral.fleet.backends import BackendState

    cfg = RegisteredBackend(id="extra", url="http://127.0.0.1:9")
    rt.registry.add(BackendState.from_settings(cfg, registered=True))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not JSON"),
        ('["a", "list"]', "not shaped as corral writes it"),
        ('{"backends": {"id": "x"}}', "not shaped as corral writes it"),
    ],
)
def test_an_unusable_file_is_moved_aside_not_overwritten(
    tmp_path: Path, content: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bad file is kept beside the state file and the log says where; the next change
    writes a fresh file."""
    state = tmp_path / "state.json"
    state.write_text(content)
    rt = start(state)
    [kept] = list(tmp_path.glob("state.json.bad-*"))
    assert kept.read_text() == content
    out = capsys.readouterr().out
    assert "state file unusable; moved aside" in out
    assert problem in out
    assert str(kept) in out
    register(rt)
    assert [b["id"] for b in json.loads(state.read_text())["backends"]] == ["extra"]
    assert kept.read_text() == content


def test_an_unreadable_path_is_left_alone(tmp_path: Path) -> None:
    """A state_file that is a directory cannot be read: nothing is written over it."""
    state = tmp_path / "state.json"
    state.mkdir()
    rt = start(state)
    register(rt)
    assert state.is_dir()
    assert list(tmp_path.iterdir()) == [state]


def test_entries_are_checked_as_the_admin_api_checks_them(tmp_path: Path) -> None:
    """An edited file cannot restore what the admin API would refuse: a file:// URL, an
    absurd max_concurrent, a negative ttl_s, an unknown key. The good entry comes back."""
    state = tmp_path / "state.json"
    entries = [
        {"id": "x", "url": "file:///etc/passwd"},
        {"id": "y", "url": "http://127.0.0.1:1", "max_concurrent": 10**9},
        {"id": "z", "url": "http://127.0.0.1:2", "ttl_s": -5},
        {"id": "w", "url": "http://127.0.0.1:3", "bogus": 1},
        "not an object",
        {"id": "ok", "url": "http://127.0.0.1:4", "max_concurrent": 2, "ttl_s": 30},
    ]
    state.write_text(json.dumps({"backends": entries}))
    rt = start(state)
    restored = {b.id: b for b in rt.registry.all()}
    assert set(restored) == {"a", "ok"}
    assert (restored["ok"].max_concurrent, restored["ok"].ttl_s) == (2, 30.0)
