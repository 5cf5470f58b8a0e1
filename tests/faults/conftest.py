"""The fault suite runs on the end-to-end tests' fixtures: real backends,
real lbproxy nodes and lborch, loopback only, every process ended by PID."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from e2e_fixtures import backends, lbproxy, workdir  # noqa: E402,F401 (fixtures)
