"""The results file: one JSON record per line, appended whole and fsync-ed.

A crash can at worst leave a torn last line; ``repair`` cuts it off before a
resumed run appends.  Readers skip what is not a record (a torn last line, a
line a disk or an editor garbled) and say so, one line each, naming FILE:LINE:
one bad line costs that record (a resumed run runs its point again), never the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_results(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, problems): every well-formed record in file order, and one line per skipped line."""
    if not path.exists():
        return [], []
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for n, line in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            problems.append(f"{path}:{n}: skipped a torn last line (an interrupted write)")
            break
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
            reason = str(e).split(":")[0] if isinstance(e, ValueError) else "nested too deep"
            problems.append(f"{path}:{n}: skipped a corrupt line (not JSON: {reason})")
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("point"), str)
                and isinstance(rec.get("repeat"), int) and not isinstance(rec.get("repeat"), bool)):
            problems.append(f"{path}:{n}: skipped a line that is not a results record (no point and repeat)")
            continue
        records.append(rec)
    return records, problems


def read_records(path: Path) -> list[dict[str, Any]]:
    """The well-formed records of a results file (``read_results`` without the problems)."""
    return read_results(path)[0]


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


def done_keys(records: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(point id, repeat) of every finished record (failed ones included: a failure is a result)."""
    return {(r["point"], int(r["repeat"])) for r in records if "point" in r and "repeat" in r}
