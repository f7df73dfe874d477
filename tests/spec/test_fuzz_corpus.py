"""The input-file fuzzers' seed corpus and crash reproducers (``tests/spec/fuzz_corpus/TARGET``),
replayed through the fuzz targets (``bench/fuzz/targets.py``): topology and suite YAML, Mahimahi and
CSV traces, events files.  Each input loads or is refused with one line (SpecError), nothing else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from testbed.spec.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
_spec = importlib.util.spec_from_file_location("fuzz_targets", REPO / "bench" / "fuzz" / "targets.py")
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)
INPUTS = sorted(p for d in CORPUS.iterdir() for p in d.iterdir())


def test_every_target_has_seeds() -> None:
    for name in ("topology", "suite", "trace", "events"):
        assert any(p.name.startswith("seed-") for p in (CORPUS / name).iterdir()), name


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_input(path: Path) -> None:
    """Seeds are valid files and load; a crash reproducer may only be refused, in one line."""
    data = path.read_bytes()
    if path.name.startswith("seed-"):
        targets.TARGETS[path.parent.name](data)
    else:
        try:
            targets.TARGETS[path.parent.name](data)
        except SpecError as e:
            assert "\n" not in str(e)


# ---- what the fuzzers found, each fixed in the parser ----------------------------------------------

def _refusal(name: str, data: bytes) -> str:
    with pytest.raises(SpecError) as e:
        targets.TARGETS[name](data)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_key_with_a_line_break_stays_one_line() -> None:
    """suite: ``roles: {"devic\\nrol"}`` printed the key raw, breaking the one-line error."""
    text = _refusal("suite", (CORPUS / "suite" / "crash-newline-in-key").read_bytes())
    assert "roles.devicyaml\\nrol: unknown key" in text


def test_a_home_of_an_unknown_user_is_a_missing_file() -> None:
    """topology: ``trace: ~hi`` raised RuntimeError (no user ``hi``) from Path.expanduser."""
    text = _refusal("topology", (CORPUS / "topology" / "crash-unknown-user-home").read_bytes())
    assert text.endswith("~hi: trace file not found")


def test_trace_periods_and_packet_counts_are_bounded() -> None:
    """csv: ``0,8`` then a row at 88888 s asked for 59 million opportunities (an out-of-memory stop);
    periods beyond 7 days are refused in both formats (a report bins them in 100 ms steps)."""
    oom = _refusal("trace", (CORPUS / "trace" / "crash-csv-long-period-oom").read_bytes())
    assert "more than 10000000 delivery opportunities per period (got 59258666" in oom
    assert "the period must be <= 604800 s (7 days)" in _refusal("trace", b"\x010,8\n1e6,1\n")
    assert "line 2: the last timestamp (the period) must be <= 604800000 ms" in \
        _refusal("trace", b"\x001\n9223372036854775807\n")
