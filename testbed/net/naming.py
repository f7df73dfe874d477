"""Run identity: run id, device-name prefix, environment marker and the per-run state file.

Every root-namespace device the testbed creates is named ``tb<run id><suffix>`` (at most 15
characters), every process it starts inherits ``TESTBED_RUN=<run id>``, and
``/run/testbed/<run id>.json`` lists what exists so ``testbed clean`` can remove leftovers.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

PREFIX = "tb"
ENV_MARKER = "TESTBED_RUN"
STATE_DIR = Path(os.environ.get("TESTBED_STATE_DIR", "/run/testbed"))
IFNAMSIZ = 15


def new_run_id() -> str:
    """A short random run id (5 hex digits: leaves 8 characters for device suffixes)."""
    return secrets.token_hex(3)[:5]


def device_name(run_id: str, suffix: str) -> str:
    """Root-namespace device name ``tb<run><suffix>``; raises if longer than IFNAMSIZ."""
    name = f"{PREFIX}{run_id}{suffix}"
    if len(name) > IFNAMSIZ:
        raise ValueError(f"device name too long: {name}")
    return name


class RunState:
    """The state file of one run, rewritten atomically after every change."""

    def __init__(self, run_id: str, state_dir: Path = STATE_DIR) -> None:
        self.run_id = run_id
        self.path = state_dir / f"{run_id}.json"
        self._lock = threading.Lock()
        self.data: dict[str, Any] = {
            "run_id": run_id,
            "owner_pid": os.getpid(),
            "host_pids": {},
            "interfaces": [],
            "bridges": [],
            "link_pids": [],
            "containers": [],
            "cgroups": [],
            # host-wide settings: {"changed": {sysctl: value found}, "needs": {...}} (net/hostwide.py)
            "host_settings": {"changed": {}, "needs": {}},
        }

    def mark_environment(self) -> None:
        """Set ``TESTBED_RUN`` so every host shell, link process and child inherits it."""
        os.environ[ENV_MARKER] = self.run_id

    def add(self, key: str, value: Any) -> None:
        with self._lock:
            if value not in self.data[key]:
                self.data[key].append(value)
            self._write()

    def set_host_pid(self, node: str, pid: int) -> None:
        with self._lock:
            self.data["host_pids"][node] = pid
            self._write()

    def set_host_settings(self, changed: dict[str, str], needs: dict[str, object]) -> None:
        with self._lock:
            hs = self.data["host_settings"]
            hs["changed"] = {**changed, **hs["changed"]}
            hs["needs"].update(needs)
            self._write()

    def host_settings_changed(self) -> dict[str, str]:
        """The settings to put back: ours and those handed over by runs that ended before us."""
        with self._lock:
            self._merge_handed_over()
            return dict(self.data["host_settings"]["changed"])

    def write(self) -> None:
        with self._lock:
            self._write()

    def _merge_handed_over(self) -> None:
        """Other runs may add to our file's ``host_settings.changed`` (``hand_over``): keep them."""
        try:
            on_disk = json.loads(self.path.read_text())["host_settings"]["changed"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        mine = self.data["host_settings"]["changed"]
        for key, value in on_disk.items():
            mine.setdefault(key, value)

    def _write(self) -> None:
        self._merge_handed_over()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if os.environ.get(ENV_MARKER) == self.run_id:
            del os.environ[ENV_MARKER]


def alive(pid: int | None) -> bool:
    """Does process ``pid`` exist (a run's owner, say)?"""
    return bool(pid) and os.path.exists(f"/proc/{pid}")


def hand_over(path: Path, key: str, value: str) -> None:
    """Add ``key: value`` to the ``host_settings.changed`` of another run's state file, unless it
    has its own (its owner puts it back when it ends)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    changed = data.setdefault("host_settings", {}).setdefault("changed", {})
    if key in changed:
        return
    changed[key] = value
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def load_states(state_dir: Path = STATE_DIR) -> list[dict[str, Any]]:
    """All state files present (unreadable ones are returned with only their run id)."""
    out = []
    for p in sorted(state_dir.glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            out.append({"run_id": p.stem})
    return out
