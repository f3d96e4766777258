"""The benchmark scripts under bench/ are plain modules, not a package: put bench/ on sys.path
before the test modules here import them (``import _report``, ``import fleet``)."""

from __future__ import annotations

import sys

from tests.helpers import REPO_ROOT

BENCH_DIR = str(REPO_ROOT / "bench")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
