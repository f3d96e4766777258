"""What a benchmark's main does around its work: stop every subprocess on any exit, and write
its JSON with when, how long, the machine and the settings."""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from _procs import log
from _report import finite


class Owner(Protocol):
    def close(self) -> None: ...


T = TypeVar("T")
B = TypeVar("B", bound=Owner)


def owned_run(prefix: str, owner: Callable[[Path], B], work: Callable[[B], T]) -> T:
    """``work(owner(tmp))`` in a temporary directory; ``owner`` is a process owner whose
    ``close()`` stops what it started, on any exit. SIGTERM unwinds like Ctrl-C. Exits 130
    when interrupted and 1 on a RuntimeError (a process that would not start or died)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        bench = owner(Path(tmp))
        try:
            return work(bench)
        except KeyboardInterrupt:
            log("interrupted")
            raise SystemExit(130) from None
        except RuntimeError as exc:
            log(f"error: {exc}")
            raise SystemExit(1) from None
        finally:
            bench.close()


def write_report(
    path: Path, started: float, load_before: tuple[float, ...], args: Any, body: dict[str, Any]
) -> None:
    """``body`` as JSON at ``path`` (NaN as null), after when, how long, machine, settings."""
    wall_s = round(time.time() - started, 1)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": wall_s,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **body,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(report), allow_nan=False) + "\n")
    log(f"wrote {path} ({wall_s:g} s in all)")
