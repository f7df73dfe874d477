"""What a result was measured on: kernel, CPU, package versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("edgellm-testbed", "torch", "transformers", "pyzmq", "pyroute2", "numpy", "mininet", "gguf",
            "safetensors", "tokenizers")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def collect(repo: Path | None = None) -> dict[str, Any]:
    """The environment record stored with every result (the shaper is added per point)."""
    repo = repo or Path(__file__).resolve().parents[2]
    commit = _git(repo, "rev-parse", "HEAD")
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    if commit is None and os.environ.get("TESTBED_GIT_COMMIT"):
        # a copy without .git (the VM's /testbed): the commit it was copied from, as its sender says
        commit = os.environ["TESTBED_GIT_COMMIT"]
        dirty = os.environ.get("TESTBED_GIT_DIRTY", "")
    return {
        "kernel": platform.release(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "hostname": platform.node(),
        "loadavg": list(os.getloadavg()),
    }
