"""The state file: backends registered through the admin API, and the model operations a
backend still owes the fleet (see corral.fleet.replays), survive a restart."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from corral.fleet.backends import BackendState

log = structlog.get_logger("corral.state")


class Saved(NamedTuple):
    backends: list[dict[str, Any]]
    replays: list[Any]


class StateFile:
    """One JSON object, rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Saved:
        """What was saved; an unreadable file is logged and treated as empty."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Saved([], [])
        except (OSError, ValueError) as exc:
            log.error(
                "state file unreadable; starting without it", path=str(self.path), error=str(exc)
            )
            return Saved([], [])
        if not isinstance(data, dict):
            return Saved([], [])
        backends, replays = data.get("backends"), data.get("replays")
        return Saved(
            [b for b in backends if isinstance(b, dict)] if isinstance(backends, list) else [],
            replays if isinstance(replays, list) else [],
        )

    def save(self, backends: list[BackendState], replays: list[dict[str, Any]]) -> None:
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
