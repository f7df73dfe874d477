"""A live shard node answers thousands of malformed messages, each with the right error, and keeps serving."""

from __future__ import annotations

import random
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
import zmq

from testbed.apps.inference.activations import hidden_message
from testbed.apps.inference.local_chain import loopback_chain
from testbed.apps.inference.placement import Stage
from testbed.model.tiny import make_tiny_model_dir
from testbed.wire import message as m
from testbed.wire.message import HEADER, Kind, parse

N_MESSAGES = 2400
# what the node says about each kind of bad message: the wire parser's refusal, or the shard's own
MALFORMED, HIDDEN, SESSION = "malformed message", "hidden size", "unknown session"


def _valid(rng: random.Random) -> list[bytes]:
    t = rng.randint(1, 4)
    x = torch.randn(1, t, 64)
    return [bytes(f) for f in hidden_message(rng.getrandbits(63), 0, 0, x, rng.choice(["fp32", "int8"]),
                                               True).frames()]


def _set(header: bytes, fmt: str, offset: int, value: int) -> bytes:
    b = bytearray(header)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def malformed(rng: random.Random) -> tuple[list[bytes], str]:
    """One message that must be rejected, and the reason the node must give."""
    kind = rng.randrange(11)
    if kind == 0:  # random frames
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randint(1, 5))], MALFORMED
    if kind == 1:  # random header-sized garbage
        return [rng.randbytes(HEADER.size), rng.randbytes(rng.randrange(0, 64))], MALFORMED
    v = _valid(rng)
    if kind == 2:  # truncated header
        return [v[0][: rng.randrange(0, HEADER.size)], *v[1:]], MALFORMED
    if kind == 3:  # payload shorter or longer than announced
        i = rng.randrange(1, len(v))
        cut = rng.randint(1, 8)
        v[i] = v[i][:-cut] if rng.random() < 0.5 and len(v[i]) >= cut else v[i] + bytes(cut)
        return v, MALFORMED
    if kind == 4:  # huge shape
        h = _set(v[0], "<I", 32 + 4 * rng.randrange(3), rng.choice([1 << 20, 1 << 24, 0xFFFFFFFF]))
        return [h, *v[1:]], MALFORMED
    if kind == 5:  # unknown kind
        unknown = [k for k in range(8, 256) if k not in set(Kind)]  # applications add kinds
        return [_set(v[0], "<B", 5, rng.choice(unknown)), *v[1:]], MALFORMED
    if kind == 6:  # unknown dtype, codec or version
        off, val = rng.choice([(6, rng.randint(4, 255)), (7, rng.randint(5, 255)), (4, rng.randint(2, 255))])
        return [_set(v[0], "<B", off, val), *v[1:]], MALFORMED
    if kind == 7:  # frames missing or extra
        return (v[:-1] if rng.random() < 0.5 else [*v, rng.randbytes(16)]), MALFORMED
    if kind == 8:  # wrong hidden size for this shard (valid message, wrong content)
        x = torch.randn(1, 2, rng.choice([8, 32, 128]))
        return [bytes(f) for f in hidden_message(1, 0, 0, x, "fp32", True).frames()], HIDDEN
    if kind == 9:  # continues a session that does not exist
        x = torch.randn(1, 1, 64)
        return [bytes(f) for f in hidden_message(rng.getrandbits(63), 3, rng.randint(1, 50), x, "fp16",
                                                 True).frames()], SESSION
    # bit flips in the fixed part of the header (magic, version, kind, dtype, codec, flags, counts)
    b = bytearray(v[0])
    pos = rng.randrange(0, 13)
    b[pos] ^= 1 << rng.randrange(8)
    if pos in (8, 9):  # a flipped kv-cache bit would still be valid: set an unknown flag instead
        return [_set(v[0], "<H", 8, 0x8000 | rng.randrange(2)), *v[1:]], MALFORMED
    return [bytes(b), *v[1:]], MALFORMED


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=2, hidden=64)


def reason(text: str) -> str:
    return next((why for why in (MALFORMED, HIDDEN, SESSION) if why in text), text)


@pytest.mark.slow
def test_node_survives_fuzzing(tiny: Path, tmp_path: Path) -> None:
    rng = random.Random(1234)
    with loopback_chain(tiny, [Stage("a", 0, 1), Stage("b", 1, 2)], logs=tmp_path) as addrs:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(addrs[1])
        try:
            wrong: list[str] = []
            sent: Counter[str] = Counter()
            for i in range(N_MESSAGES):
                frames, why = malformed(rng)
                sent[why] += 1
                sock.send_multipart(frames)
                assert sock.poll(10_000), f"the node stopped answering at message {i}"
                reply = parse(sock.recv_multipart())
                got = reason(reply.text()) if reply.kind == Kind.ERROR else reply.kind.name
                # a message the parser refused cannot name its session; one the shard refused does
                echoed = (reply.session == 0) == (why == MALFORMED)
                if got != why or not echoed:
                    wrong.append(f"message {i}: expected {why!r}, got {got!r} (session {reply.session:#x})")
            assert not wrong, f"{len(wrong)} wrong replies:\n" + "\n".join(wrong[:10])
            assert all(sent[why] > 50 for why in (MALFORMED, HIDDEN, SESSION)), sent  # each kind exercised
            # still serving a valid request, and it counted every refusal
            x = torch.randn(1, 3, 64)
            sock.send_multipart(hidden_message(99, 0, 0, x, "fp32", True).frames())
            assert sock.poll(10_000)
            ok = parse(sock.recv_multipart())
            assert ok.kind == Kind.RESULT and 0 <= int(ok.tensor()[0]) < 400
            sock.send_multipart(m.control(Kind.PING).frames())
            assert sock.poll(5000)
            sessions, _, served, errors = parse(sock.recv_multipart()).tensor().tolist()
            assert (sessions, served, errors) == (1, 1, N_MESSAGES)
        finally:
            sock.close(0)
    # the node lived through it all (loopback_chain raises for one that died) and logged no traceback
    assert "Traceback" not in (tmp_path / "shard-b.log").read_text()
