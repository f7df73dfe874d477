"""Files written whole or not at all (a base utility for every layer)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(target: str | Path, data: bytes | str) -> None:
    """``data`` at ``target``, whole or not at all: a temporary file beside it, fsync, rename, fsync of
    the folder (so a crash leaves the old file or the new one, and the rename itself survives)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
