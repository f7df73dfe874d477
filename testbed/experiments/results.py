"""The results file: one JSON record per line, appended whole and fsync-ed.

A crash can at worst leave a torn last line; ``repair`` cuts it off before a
resumed run appends, and ``read_records`` ignores it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_records(path: Path) -> list[dict[str, Any]]:
    """Complete records of a results file (a torn or unparsable last line is ignored)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def repair(path: Path) -> int:
    """Truncate a torn last line; return the number of bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return size - end


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a single write of a whole line, then fsync."""
    line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace a file atomically: write a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def done_keys(records: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(point id, repeat) of every finished record (failed ones included: a failure is a result)."""
    return {(r["point"], int(r["repeat"])) for r in records if "point" in r and "repeat" in r}
