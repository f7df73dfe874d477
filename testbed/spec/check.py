"""One set of checks for every value a user writes: topology, trace, suite and prompt files, ``--set``
overrides and command-line flags.

Every failed check is one :class:`~testbed.spec.errors.SpecError` ``SOURCE: field: problem (got VALUE)``.
Numbers are checked against a :class:`Range`; the ranges below are the documented bounds (README,
"Command line"): a value outside them is a typo (Mbit/s for bit/s, ms for us), not an experiment.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.spec.errors import SpecError, got
from testbed.spec.topology import MIN_MEMORY_MB


def machine_cores() -> int:
    """CPU cores of this machine (the bound of a node's ``cpu`` share)."""
    return os.cpu_count() or 1


def machine_memory_mb() -> int:
    """Physical memory of this machine in MiB (the bound of a node's ``memory_mb``)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):  # pragma: no cover - every Linux has both
        return 1 << 30


def _num(x: float) -> str:
    """A bound as text: 100000, 0.5, 1e+06 for big non-round values."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The values a number may take: a lower bound (exclusive ``gt`` or inclusive ``ge``), an upper bound
    ``le`` (inclusive), whether it must be an integer, and what the upper bound means (``note``)."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    integer: bool = False
    note: str = ""

    def kind(self) -> str:
        """The rule broken by a value of the wrong type, e.g. ``must be an integer >= 1``."""
        if not self.integer:
            return "must be a finite number"
        return "must be an integer" + (f" >= {_num(self.ge)}" if self.ge is not None else "")

    def violation(self, value: Any) -> str | None:
        """What is wrong with ``value`` (without the ``(got ...)`` part), or None if it is allowed."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self.kind()
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if isinstance(value, int) and abs(value) > 1e308:  # an integer literal beyond any float
            return "must be a finite number"
        if self.integer and isinstance(value, float) and not value.is_integer():
            return self.kind()
        what = "an integer " if self.integer else ""
        if self.gt is not None and not value > self.gt:
            return f"must be {what}> {_num(self.gt)}"
        if self.ge is not None and not value >= self.ge:
            return f"must be {what}>= {_num(self.ge)}"
        if self.le is not None and not value <= self.le:
            note = f" ({self.note})" if self.note else ""
            return f"must be {what}<= {_num(self.le)}{note}"
        return None

    def convert(self, value: int | float) -> int | float:
        """The checked value as the type it stands for (``1e3`` for an integer is 1000)."""
        return int(value) if self.integer else float(value)


# -- the documented bounds ----------------------------------------------------------------------
ANY_NUMBER = Range()  # any finite number
BW_MBIT = Range(gt=0, le=100_000, note="100 Gbit/s")
DELAY_MS = Range(ge=0, le=10_000, note="10 s")
JITTER_MS = Range(ge=0, le=10_000, note="10 s")  # and never above the link's delay_ms
LOSS_PCT = Range(ge=0, le=100)
QUEUE_PKTS = Range(ge=1, le=100_000, integer=True, note="150 MB of 1500-byte packets")
CPU = Range(gt=0, le=machine_cores(), note=f"the {machine_cores()} cores of this machine")
MEMORY_MB = Range(ge=MIN_MEMORY_MB, le=machine_memory_mb(), integer=True,
                  note=f"the {machine_memory_mb()} MiB of this machine")
KV_BUDGET_MB = Range(ge=1, le=machine_memory_mb(), integer=True,
                     note=f"the {machine_memory_mb()} MiB of this machine")
REPEATS = Range(ge=1, le=1000, integer=True)
MAX_NEW_TOKENS = Range(ge=1, le=4096, integer=True, note="half the model's 8192-token context")
DEVICES = Range(ge=1, le=256, integer=True)  # and never more than the topology's device nodes
CUT = Range(ge=1, le=1024, integer=True)  # the model's layer count is checked when a placement is built
POWER_W = Range(ge=0, le=10_000)
NJ_PER_BIT = Range(ge=0, le=1e6)
BAND = Range(gt=0, le=1000)
SECONDS = Range(gt=0, le=3600, note="one hour")
PROBABILITY = Range(ge=0, le=1)
SEED = Range(ge=0, le=2**32 - 1, integer=True)
BIN_MS = Range(ge=1, le=3_600_000)
EVAL_TOKENS = Range(ge=2, le=1_000_000, integer=True)
TRACE_START_S = Range(ge=0, le=86_400, note="one day")  # the trace loops: any point of its clock
DURATION_S = Range(gt=0, le=3600, note="one hour")

# name -> range, for the README table and for --set values of link and node fields
BOUNDS: dict[str, Range] = {
    "bw_mbit": BW_MBIT, "delay_ms": DELAY_MS, "jitter_ms": JITTER_MS, "loss_pct": LOSS_PCT,
    "queue_pkts": QUEUE_PKTS, "cpu": CPU, "memory_mb": MEMORY_MB, "repeats": REPEATS,
    "kv_budget_mb": KV_BUDGET_MB,
    "max_new_tokens": MAX_NEW_TOKENS, "devices": DEVICES, "cut": CUT,
}


def read_input(path: str | Path, source: str | Path | None = None, field: str = "file",
               what: str = "file") -> bytes:
    """The bytes of an input file, or one SpecError ``SOURCE: FIELD: PATH: WHAT not found``.

    ``source`` is the file or flag that named this one (default: the file itself, then the message
    does not repeat its path).
    """
    where, at = (path, "") if source is None else (source, f"{path}: ")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        why = f"{what} not found"
    except IsADirectoryError:
        why = "not a regular file"
    except OSError as e:
        why = f"cannot read ({e.strerror or e})"
    raise SpecError(where, field, at + why)


class Checker:
    """Checks for the values of one source (a file, or a command); every failure names it."""

    def __init__(self, source: str | Path) -> None:
        self.source = source

    def fail(self, field: str, message: str) -> SpecError:
        return SpecError(self.source, field or "(top level)", message)

    def mapping(self, value: Any, field: str, allowed: Iterable[str] | None = None,
                what: str = "a mapping") -> Mapping[Any, Any]:
        """A mapping whose keys are all in ``allowed`` (any keys when None)."""
        if not isinstance(value, Mapping):
            raise self.fail(field, f"must be {what} {got(value)}")
        if allowed is not None:
            allowed = tuple(allowed)
            for key in value:
                if key not in allowed:
                    where = f"{field}.{key}" if field else str(key)
                    raise self.fail(where, f"unknown key {key!r} (expected one of {', '.join(allowed)})")
        return value

    def number(self, value: Any, field: str, rng: Range = ANY_NUMBER) -> Any:
        """A number inside ``rng``: an int for integer ranges, else a float."""
        problem = rng.violation(value)
        if problem:
            raise self.fail(field, f"{problem} {got(value)}")
        return rng.convert(value)

    def choice(self, value: Any, field: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        if isinstance(value, bool) or value not in choices:
            raise self.fail(field, f"must be one of {', '.join(choices)} {got(value)}")
        return value

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false {got(value)}")
        return value

    def text(self, value: Any, field: str, what: str = "a non-empty string") -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"must be {what} {got(value)}")
        return value

    def path(self, value: Any, field: str, what: str = "a file path") -> str:
        """A path as written: non-empty text without NUL bytes (no file system call takes one)."""
        if "\0" in self.text(value, field, what):
            raise self.fail(field, f"must be {what} without NUL bytes {got(value)}")
        return value

    def items(self, value: Any, field: str, what: str = "a non-empty list") -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.fail(field, f"must be {what} {got(value)}")
        return value


def _parse_flag_number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return None


def flag_number(rng: Range) -> Callable[[str], Any]:
    """An ``argparse`` ``type=`` for a numeric flag checked against ``rng`` (same messages as files)."""
    def parse(text: str) -> Any:
        value = _parse_flag_number(text)
        if value is None:
            raise argparse.ArgumentTypeError(f"{rng.kind()} (got {text!r})")
        problem = rng.violation(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem} (got {text})")
        return rng.convert(value)

    parse.__name__ = "integer" if rng.integer else "number"
    return parse


def flag_choice(choices: Iterable[str]) -> Callable[[str], str]:
    """An ``argparse`` ``type=`` for a flag with a closed set of values (same message as files)."""
    choices = tuple(choices)

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)} (got {text!r})")
        return text

    parse.__name__ = "choice"
    return parse
