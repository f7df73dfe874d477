"""Validation errors that print as one line: ``FILE: path.to.field: what is wrong``."""

from __future__ import annotations

from pathlib import Path


class SpecError(Exception):
    """Bad input in a topology, suite or trace file."""

    def __init__(self, file: str | Path, field: str, message: str) -> None:
        self.file = str(file)
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"
