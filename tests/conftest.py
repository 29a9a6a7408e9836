"""Shared fixtures: the tiny model built once, and ONE real tritonserver per test session."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "backend_src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
