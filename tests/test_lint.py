"""The code base stays ruff-clean (configuration in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    argv = [sys.executable, "-m", "ruff", "check", "--no-cache", "testbed", "nodes", "tests", "bench"]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
