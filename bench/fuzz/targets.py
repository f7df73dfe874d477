"""What each fuzzer feeds its bytes to, and the only errors each parser may raise.

Shared by the atheris fuzzers in this folder (``fuzz_*.py``) and by the regression tests that
replay the seed corpus and every crash reproducer (``tests/*/test_fuzz_corpus.py``), so a test runs
exactly what the fuzzer ran.  A target returns normally or raises one of its ``DOCUMENTED``
errors (``WireError`` for the wire, ``SpecError`` -- the one-line ``FILE: field: problem`` -- for
every input file); anything else is a bug.

Wire inputs are multipart messages packed into one byte string (:func:`pack_frames`): a frame
count, then each frame but the last with a 2-byte length, then the last frame.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from testbed.spec.errors import SpecError
from testbed.wire.payload import WireError

MAX_FRAMES = 6
FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parents[1]


# ---- the wire ---------------------------------------------------------------------------------------

def pack_frames(frames: Sequence[bytes]) -> bytes:
    """A multipart message as one fuzz input (the inverse of :func:`unpack_frames`)."""
    if not frames:
        return b"\x00"
    out = [bytes([len(frames)])]
    for f in frames[:-1]:
        out.append(struct.pack("<H", len(f)) + bytes(f))
    out.append(bytes(frames[-1]))
    return b"".join(out)


def unpack_frames(data: bytes) -> list[bytes]:
    """Any byte string as a multipart message of 0..MAX_FRAMES frames."""
    if not data:
        return []
    n = data[0] % (MAX_FRAMES + 1)
    pos, frames = 1, []
    for _ in range(max(0, n - 1)):
        size = struct.unpack_from("<H", data, pos)[0] if pos + 2 <= len(data) else 0
        pos += 2
        frames.append(data[pos:pos + size])
        pos += size
    if n:
        frames.append(data[pos:])
    return frames


def wire(data: bytes) -> None:
    """What a shard node does with every inbound message: ``parse``, then read its payload (token ids,
    or activations through their codec); a parsed message must also survive re-encoding unchanged."""
    from testbed.model.codecs import get_codec
    from testbed.wire.message import DType, parse

    msg = parse(unpack_frames(data))
    again = parse(msg.frames())
    if (again.kind, again.dtype, again.codec, again.shape, again.session, again.step, again.flags) != \
            (msg.kind, msg.dtype, msg.codec, msg.shape, msg.session, msg.step, msg.flags):
        raise AssertionError(f"re-encoding changed the message: {msg} -> {again}")
    if msg.dtype == DType.INT64:
        msg.tensor()
    elif msg.dtype == DType.HIDDEN:
        assert msg.codec is not None
        get_codec(msg.codec).decode(msg.payload, msg.shape)
    elif msg.dtype == DType.TEXT:
        msg.text()


# ---- input files ------------------------------------------------------------------------------------

class _Scratch:
    """One folder per process for files a target needs on disk (a suite's topology and prompts, a
    trace); a topology or suite that names a relative file finds these."""

    def __init__(self) -> None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # memory: a trace is written per input
        self.dir = Path(tempfile.mkdtemp(prefix="fuzz-", dir=shm))
        (self.dir / "t.yaml").write_text(
            "nodes: {phone: {role: device}, mec: {role: edge}, cloud: {role: cloud}}\n"
            "links:\n  - {between: [phone, mec], up: {bw_mbit: 10, delay_ms: 5}}\n"
            "  - {between: [mec, cloud], up: {trace: tr.csv}}\n")
        (self.dir / "p.yaml").write_text("prompts: [{id: a, text: hello}, {id: 2, text: world}]\n")
        (self.dir / "tr.csv").write_text("time_s,bw_mbit\n0,10\n1,0\n")
        (self.dir / "tr.mm").write_text("1\n2\n2\n5\n")


_scratch: _Scratch | None = None


def scratch() -> Path:
    global _scratch
    if _scratch is None:
        _scratch = _Scratch()
    return _scratch.dir


def _text(data: bytes, source: Path) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as e:  # the loaders' own wording (testbed.spec.yamlfile.load_yaml)
        raise SpecError(source, "file", f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def topology(data: bytes) -> None:
    """A topology file: YAML, then the topology checks (traces it names are read too)."""
    from testbed.spec.parse import parse_topology
    from testbed.spec.yamlfile import parse_yaml

    src = scratch() / "fuzz-topology.yaml"
    parse_topology(parse_yaml(_text(data, src), src), src)


def suite(data: bytes) -> None:
    """A suite file (its topology and prompt set are the scratch folder's valid ones, or whatever
    the input names)."""
    from testbed.spec.suite import parse_suite
    from testbed.spec.yamlfile import parse_yaml

    src = scratch() / "fuzz-suite.yaml"
    parse_suite(parse_yaml(_text(data, src), src), src)


_events_topology = None


def events(data: bytes) -> None:
    """An events file (``--events``), checked against the shipped three-cell topology (links, cells
    and devices for every kind of event, handovers included)."""
    global _events_topology
    from testbed.spec.events import load_events
    from testbed.spec.topology import load_topology

    if _events_topology is None:
        _events_topology = load_topology(REPO / "topologies" / "cells-3.yaml")
    src = scratch() / "fuzz-events.yaml"
    src.write_bytes(data)
    load_events(src, _events_topology)


def _trace(data: bytes, fmt: str) -> None:
    from testbed.spec import traces

    path = scratch() / f"fuzz-trace.{fmt}"
    path.write_bytes(data)
    # parsed traces are cached by content (up to 32, each up to 80 MB of opportunities): a run of
    # millions of distinct inputs would fill memory with them
    traces._parse_cached.cache_clear()
    tr = traces.load_trace(path, fmt)
    # what the shapers and reports ask of a loaded trace
    tr.mean_mbit()
    tr.rate_bins_mbit(100.0)
    tr.capacity_mbit_per_s(3, start_s=0.5)
    tr.step_at(1.5)


def mahimahi(data: bytes) -> None:
    _trace(data, "mahimahi")


def csv(data: bytes) -> None:
    _trace(data, "csv")


def trace(data: bytes) -> None:
    """Either trace format, chosen by the first byte (one fuzzer covers both parsers)."""
    if data:
        (csv if data[0] & 1 else mahimahi)(data[1:])


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire": wire, "topology": topology, "suite": suite, "trace": trace, "mahimahi": mahimahi, "csv": csv,
    "events": events,
}
DOCUMENTED: dict[str, tuple[type[Exception], ...]] = {
    "wire": (WireError,), "topology": (SpecError,), "suite": (SpecError,), "trace": (SpecError,),
    "mahimahi": (SpecError,), "csv": (SpecError,), "events": (SpecError,),
}


def checked(name: str) -> Callable[[bytes], None]:
    """The target ``name`` with its documented errors swallowed: what the fuzzer runs."""
    target, allowed = TARGETS[name], DOCUMENTED[name]

    def run(data: bytes) -> None:
        try:
            target(data)
        except allowed as e:
            if "\n" in str(e):
                raise AssertionError(f"a documented error spans several lines: {e!r}") from None

    return run


PRELOAD = ("testbed.wire.message", "testbed.model.codecs", "testbed.spec.yamlfile", "testbed.spec.parse",
           "testbed.spec.suite", "testbed.spec.traces", "testbed.spec.events", "testbed.spec.topology")


def preload() -> None:
    """Import every module the targets use (the fuzzers call this inside atheris' instrumentation)."""
    import importlib

    for mod in PRELOAD:
        importlib.import_module(mod)
