"""Wire header: round trips and every validation failure."""

from __future__ import annotations

import struct

import pytest
import torch

from testbed.wire import message as m
from testbed.wire.message import HEADER, DType, Kind, WireError, parse


def _raw(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def _header(**over) -> list:
    """Field values of a valid FORWARD(INT64 [1, 3]) header, with overrides."""
    f = dict(magic=m.MAGIC, version=m.VERSION, kind=int(Kind.FORWARD), dtype=int(DType.INT64), codec=0,
             flags=1, ndim=2, nframes=1, nhops=0, session=7, step=0, pos=0,
             shape=[1, 3, 0, 0], sizes=[24, 0, 0, 0])
    f.update(over)
    return [f["magic"], f["version"], f["kind"], f["dtype"], f["codec"], f["flags"], f["ndim"],
            f["nframes"], f["nhops"], f["session"], f["step"], f["pos"], *f["shape"], *f["sizes"]]


def _msg(payload: bytes = bytes(24), **over) -> list[bytes]:
    return [HEADER.pack(*_header(**over)), payload]


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
def test_hidden_round_trip(codec: str) -> None:
    x = torch.randn(1, 5, 64)
    msg = parse(_raw(m.forward_hidden(123, 4, 17, x, codec, kv_cache=True).frames()))
    assert (msg.kind, msg.session, msg.step, msg.position_start) == (Kind.FORWARD, 123, 4, 17)
    assert msg.codec == codec
    assert msg.kv_cache and msg.shape == (1, 5, 64)
    assert torch.allclose(msg.tensor(), x, atol=0.1 if codec == "int8" else 0.05)


def test_tokens_result_error_control_round_trip() -> None:
    ids = torch.tensor([[1, 2, 3]])
    msg = parse(_raw(m.forward_tokens(9, 0, 0, ids, kv_cache=False).frames()))
    assert not msg.kv_cache and torch.equal(msg.tensor(), ids)
    hops = [m.Hop(1.5, 0.25, 9.0, 4.0, 1000, 80), m.Hop(2.0, 0.0, 3.0, 0.0, 900, 0)]
    r = parse(_raw(m.result(9, 5, 42, hops).frames()))
    assert r.kind == Kind.RESULT and int(r.tensor()[0]) == 42 and r.step == 5
    assert [(h.compute_ms, h.bytes_in, h.bytes_reply_in) for h in r.hops] == [(1.5, 1000, 80), (2.0, 900, 0)]
    e = parse(_raw(m.error(9, 5, "boom \u2713").frames()))
    assert e.kind == Kind.ERROR and e.text() == "boom \u2713"
    assert parse(_raw(m.control(Kind.CLOSE, 9).frames())).session == 9
    assert parse(_raw(m.pong([1, 2, 3, 4]).frames())).tensor().tolist() == [1, 2, 3, 4]
    assert parse(_msg()).nbytes == HEADER.size + 24


@pytest.mark.parametrize(("frames", "why"), [
    ([], "empty"),
    ([b"short"], "header is"),
    ([HEADER.pack(*_header())[:-1], bytes(24)], "header is"),
    (_msg(magic=b"XXXX"), "magic"),
    (_msg(version=9), "version"),
    (_msg(kind=99), "99"),
    (_msg(dtype=42), "42"),
    (_msg(kind=int(Kind.CLOSE)), "cannot carry"),
    (_msg(kind=int(Kind.RESULT), dtype=int(DType.HIDDEN), codec=1), "cannot carry"),
    (_msg(flags=0x80), "flags"),
    (_msg(codec=77), "codec"),
    (_msg(codec=1), "codec goes with"),
    (_msg(dtype=int(DType.HIDDEN), shape=[1, 3, 0, 0]), "codec goes with"),
    (_msg(ndim=5), "out of range"),
    (_msg(nframes=5), "out of range"),
    (_msg(nhops=17), "out of range"),
    (_msg(shape=[1, 1 << 21, 0, 0]), "too large"),
    (_msg(ndim=4, shape=[1 << 20, 1 << 20, 1 << 20, 1 << 20]), "too large"),
    (_msg(shape=[1, 3, 0, 5]), "must be zero"),
    (_msg(sizes=[24, 0, 0, 9]), "must be zero"),
    (_msg(sizes=[23, 0, 0, 0]), "do not match"),
    (_msg(bytes(23)), "header says"),
    (_msg() + [b"extra"], "frames"),
    (_msg()[:1], "frames"),
    (_msg(nhops=1) + [b"x" * 5], "hop records"),
    (_msg(dtype=int(DType.HIDDEN), codec=2, shape=[1, 3, 4, 0], ndim=3, sizes=[24, 0, 0, 0]), None),
    (_msg(dtype=int(DType.HIDDEN), codec=4, shape=[1, 3, 4, 0], ndim=3, sizes=[24, 0, 0, 0]),
     "do not match"),
    (_msg(dtype=int(DType.HIDDEN), codec=1, shape=[12, 0, 0, 0], ndim=1, sizes=[48, 0, 0, 0]), "2 dim"),
    ([HEADER.pack(*_header(kind=int(Kind.ERROR), dtype=int(DType.TEXT), ndim=1, shape=[5000, 0, 0, 0],
                           sizes=[5000, 0, 0, 0])), bytes(5000)], "text"),
])
def test_validation_failures(frames: list[bytes], why: str | None) -> None:
    if why is None:  # control case: the same layout is valid
        parse(frames)
        return
    with pytest.raises(WireError, match=why):
        parse(frames)


def test_header_is_fixed_size_little_endian() -> None:
    assert HEADER.size == struct.calcsize("<4sBBBBHBBB3xQII4I4I")
    raw = bytes(m.control(Kind.PING, 0x0102030405060708).frames()[0])
    assert raw[:4] == m.MAGIC and raw[16:24] == bytes(range(8, 0, -1))
