"""Wire header: round trips and every validation failure."""

from __future__ import annotations

import struct

import pytest
import torch

from testbed.model.codecs import get_codec
from testbed.spec.options import CODECS
from testbed.wire import message as m
from testbed.wire import payload
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


def _hidden(session: int, step: int, pos: int, x: torch.Tensor, codec: str, kv_cache: bool) -> m.Message:
    return m.forward_hidden(session, step, pos, x.shape, codec, get_codec(codec).encode(x), kv_cache)


@pytest.mark.parametrize("codec", CODECS)
def test_hidden_round_trip(codec: str) -> None:
    x = torch.randn(1, 5, 64)
    msg = parse(_raw(_hidden(123, 4, 17, x, codec, kv_cache=True).frames()))
    assert (msg.kind, msg.session, msg.step, msg.position_start) == (Kind.FORWARD, 123, 4, 17)
    assert msg.codec == codec
    assert msg.kv_cache and msg.shape == (1, 5, 64)
    y = get_codec(codec).decode(msg.payload, msg.shape)
    assert torch.allclose(y, x, atol=0.1 if codec == "int8" else 0.05)
    with pytest.raises(WireError, match="not an integer tensor"):
        msg.tensor()


def test_every_encoding_has_a_wire_id_and_a_layout() -> None:
    assert tuple(payload.CODEC_IDS) == CODECS
    assert len(set(payload.CODEC_IDS.values())) == len(CODECS) and 0 not in payload.CODEC_IDS.values()
    for codec in CODECS:
        assert payload.bytes_per_token(codec, 576) == get_codec(codec).bytes_per_token(576)


@pytest.mark.parametrize(("codec", "sizes"), [
    ("fp32", [4 * 3 * 10]), ("fp16", [2 * 3 * 10]), ("bf16", [2 * 3 * 10]),
    ("int8", [3 * 10, 4 * 3, 2 * 3 * 4, 2 * 3 * 4]),
])
def test_layout_table(codec: str, sizes: list[int]) -> None:
    """The documented layout, figure by figure, and what the codec really sends."""
    shape = (1, 3, 10)
    assert payload.frame_sizes(codec, shape) == sizes
    frames = get_codec(codec).encode(torch.randn(*shape))
    assert [memoryview(f).nbytes for f in frames] == sizes
    views = payload.unpack(codec, frames, shape)
    assert [v.nbytes for v in views] == sizes


def test_layout_refusals() -> None:
    with pytest.raises(WireError, match="unknown codec"):
        payload.layout("fp8", (1, 2, 3))
    with pytest.raises(WireError, match="hidden sizes up to 65535"):
        payload.layout("int8", (1, 1, 70000))
    assert payload.outliers(2) == 2 and payload.frame_sizes("int8", (1, 1, 2)) == [2, 4, 4, 4]
    with pytest.raises(WireError, match="expected 4 payload frames"):
        payload.unpack("int8", [b""], (1, 0, 8))
    with pytest.raises(WireError, match="values frame has 7 bytes, expected 8"):
        payload.unpack("fp32", [bytes(7)], (1, 1, 2))
    # a sender cannot put frames that do not fit the shape into a message
    with pytest.raises(WireError, match="do not fit shape"):
        m.forward_hidden(1, 0, 0, (1, 2, 8), "fp16", [bytes(31)], True)


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
