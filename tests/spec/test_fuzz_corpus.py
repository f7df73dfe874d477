"""The input-file fuzzers' seed corpus and crash reproducers (``tests/spec/fuzz_corpus/TARGET``),
replayed through the fuzz targets (``bench/fuzz/targets.py``): topology and suite YAML, Mahimahi and
CSV traces.  Each input loads or is refused with one line (SpecError), nothing else."""

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
    for name in ("topology", "suite", "trace"):
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
