"""Bad training texts for ``--data`` and a suite's ``workload.data`` (both checked by spec/corpora.py)."""

from __future__ import annotations

from pathlib import Path


def bad_text(tmp_path: Path, kind: str) -> str:
    """A path to a bad training text of ``kind``, made in ``tmp_path`` where it is a file."""
    files = {"empty": b"", "blank": b" \n\t\n", "latin1": "caf\u00e9".encode("latin-1")}
    if kind in files:
        (tmp_path / f"{kind}.txt").write_bytes(files[kind])
        return str(tmp_path / f"{kind}.txt")
    return {"missing": str(tmp_path / "no-such.txt"), "directory": str(tmp_path),
            "unreadable": "/proc/self/mem",  # open() works, read() fails with EIO: unreadable even for root
            "device": "/dev/null", "nul": "a\0b.txt", "corpus": "fortunes:no-such-collection"}[kind]
