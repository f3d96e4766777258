"""The state file: backends registered through the admin API, and the model operations a
backend still owes the fleet (see corral.fleet.replays), survive a restart."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from corral.fleet.backends import BackendState

log = structlog.get_logger("corral.state")


class Saved(NamedTuple):
    backends: list[Any]  # each validated when restored
    replays: list[Any]


class StateFile:
    """One JSON object, rewritten atomically on every change.

    A file that cannot be used is never overwritten unseen: one that does not parse, or is not
    shaped as corral writes it, is moved aside (``state.json.bad-<time>``) and corral starts
    without it, saying where the copy is; one that cannot be read at all (permissions, say)
    is left alone and changes are not saved until it is fixed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.frozen = False  # True: saving would overwrite a file corral could not read

    def load(self) -> Saved:
        """What was saved (see the class docstring for a file that cannot be used)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Saved([], [])
        except (OSError, UnicodeDecodeError) as exc:
            self.frozen = True
            log.error(
                "state file unreadable; starting without it and not saving changes until it "
                "is fixed",
                path=str(self.path),
                error=str(exc),
            )
            return Saved([], [])
        try:
            data = json.loads(text)
        except ValueError as exc:
            self._set_aside(f"not JSON: {exc}")
            return Saved([], [])
        backends = data.get("backends", []) if isinstance(data, dict) else None
        replays = data.get("replays", []) if isinstance(data, dict) else None
        if not isinstance(backends, list) or not isinstance(replays, list):
            self._set_aside('not shaped as corral writes it: {"backends": [...], "replays": [...]}')
            return Saved([], [])
        return Saved(backends, replays)

    def _set_aside(self, problem: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        kept = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        try:
            os.replace(self.path, kept)
        except OSError as exc:
            self.frozen = True
            log.error(
                "state file unusable and cannot be moved aside; starting without it and not "
                "saving changes until it is fixed",
                path=str(self.path),
                problem=problem,
                error=str(exc),
            )
            return
        log.error(
            "state file unusable; moved aside, starting without it",
            path=str(self.path),
            kept_as=str(kept),
            problem=problem,
        )

    def save(self, backends: list[BackendState], replays: list[dict[str, Any]]) -> None:
        if self.frozen:
            return
        payload = {"backends": [b.record() for b in backends if b.registered], "replays": replays}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".corral-state-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("cannot write state file", path=str(self.path), error=str(exc))
            Path(tmp).unlink(missing_ok=True)
