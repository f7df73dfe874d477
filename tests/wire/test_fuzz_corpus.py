"""The wire fuzzer's seed corpus and crash reproducers (``tests/wire/fuzz_corpus``), replayed through
the fuzz target itself (``bench/fuzz/targets.py``): each input parses or is refused with a WireError."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
_spec = importlib.util.spec_from_file_location("fuzz_targets", REPO / "bench" / "fuzz" / "targets.py")
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


def test_corpus_is_there() -> None:
    names = [p.name for p in CORPUS.iterdir()]
    assert sum(n.startswith("seed-") for n in names) >= 10


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_corpus_input(path: Path) -> None:
    """A crash reproducer (``crash-*``) raised something undocumented before its fix; now it may only
    be refused.  The seeds are valid messages: they parse, and survive re-encoding."""
    data = path.read_bytes()
    if path.name.startswith("seed-"):
        targets.wire(data)
    else:
        targets.checked("wire")(data)


def test_pack_frames_round_trip() -> None:
    frames = [b"head", b"", b"x" * 300, b"tail"]
    assert targets.unpack_frames(targets.pack_frames(frames)) == frames
    assert targets.unpack_frames(b"") == [] and targets.unpack_frames(b"\x00rest") == []


def test_int8_outlier_index_is_a_wire_error() -> None:
    """Found by the fuzzer: an int8 activation whose outlier channel index is past the hidden size
    raised a bare ValueError; it is a malformed message (WireError) like every other."""
    with pytest.raises(targets.WireError, match="outlier channel index out of range"):
        targets.wire((CORPUS / "crash-int8-outlier-index").read_bytes())
