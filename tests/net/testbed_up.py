"""``testbed up TOPOLOGY --no-cli`` as a child process, until its ``ready`` line: the run id."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def start_up(topo: Path, *extra: str, timeout_s: float = 60) -> tuple[subprocess.Popen, str]:
    """Start ``testbed up`` (this checkout's code) and wait for ready; its process and run id.
    A run that never gets ready is killed and fails the test with everything it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "testbed", "up", str(topo), "--no-cli", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready"):
            run = re.search(r"run: (\w+)", "".join(lines))
            if run:
                return p, run.group(1)
            break
    p.kill()
    pytest.fail("testbed up did not become ready: " + "".join(lines))
