"""The state file: backends registered through the admin API survive a restart."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import structlog

from corral.fleet.backends import BackendState

log = structlog.get_logger("corral.state")


class StateFile:
    """JSON list of registered backends, rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        """The saved registrations; an unreadable file is logged and treated as empty."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error(
                "state file unreadable; starting without it", path=str(self.path), error=str(exc)
            )
            return []
        backends = data.get("backends") if isinstance(data, dict) else None
        return [b for b in backends or [] if isinstance(b, dict)]

    def save(self, backends: list[BackendState]) -> None:
        payload = {"backends": [b.record() for b in backends if b.registered]}
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
