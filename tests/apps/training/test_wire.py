"""The training message kinds: round trips through ``parse`` and what each kind may carry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testbed.apps.training import wire as tw
from testbed.apps.training.server import weights_message
from testbed.spec.options import CODECS
from testbed.wire import message as m
from testbed.wire.message import HEADER, DType, Kind, WireError, parse


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("kind", [Kind.TRAIN_FORWARD, Kind.TRAIN_BACKWARD])
def test_activations_round_trip(kind, codec) -> None:
    x = torch.randn(2, 5, 64)
    msg = parse(tw.encode(kind, 9, 3, 1, x, codec).frames())
    assert (msg.kind, msg.session, msg.step, msg.position_start, msg.codec) == (kind, 9, 3, 1, codec)
    y = tw.decode(msg, 64)
    if codec == "fp32":
        assert torch.equal(x, y)
    else:
        assert torch.allclose(x, y, atol=0.1)
    with pytest.raises(WireError):
        tw.decode(msg, 32)


def test_labels_and_floats_round_trip() -> None:
    y = torch.randint(0, 300, (2, 7))
    msg = parse(m.train_labels(1, 2, 0, y).frames())
    assert torch.equal(tw.labels(msg, 300), y)
    with pytest.raises(WireError, match="out of range"):
        tw.labels(msg, 100)
    table = np.arange(24, dtype=float).reshape(2, 12) / 7
    got = parse(m.float_values(Kind.TRAIN_STATS, 1, 0, table).frames()).tensor().numpy()
    assert np.array_equal(got, table)
    flat = torch.randn(5000, dtype=torch.float64)
    w = parse(weights_message(1, flat, 2).frames())
    assert w.kind == Kind.TRAIN_WEIGHTS and w.position_start == 2
    assert torch.equal(w.tensor().reshape(-1)[:5000], flat)


def test_kinds_refuse_other_payloads() -> None:
    good = m.train_labels(1, 2, 0, torch.zeros(1, 3, dtype=torch.int64)).frames()
    fields = list(HEADER.unpack(good[0]))
    for kind in (Kind.TRAIN_FORWARD, Kind.TRAIN_BACKWARD, Kind.TRAIN_PULL, Kind.TRAIN_WEIGHTS):
        fields[2] = int(kind)  # INT64 ids under a kind that never carries them
        with pytest.raises(WireError, match="cannot carry INT64"):
            parse([HEADER.pack(*fields), good[1]])
    fields[2], fields[3] = int(Kind.TRAIN_LABELS), int(DType.FLOAT64)
    with pytest.raises(WireError, match="TRAIN_LABELS cannot carry FLOAT64"):
        parse([HEADER.pack(*fields), good[1]])
    with pytest.raises(WireError):
        m.train_hidden(Kind.FORWARD, 1, 1, 0, (1, 1, 4), "fp32", [bytes(16)])
    with pytest.raises(WireError, match="header says 24"):  # a FLOAT64 payload one value short
        fields[3] = int(DType.FLOAT64)
        fields[2] = int(Kind.TRAIN_STATS)
        parse([HEADER.pack(*fields), good[1][:-8]])


def test_fp32_adapters_cross_as_float32_exactly_at_half_the_bytes() -> None:
    flat = torch.randn(5000, dtype=torch.float32)
    single = weights_message(1, flat, 0, step=3)
    double = weights_message(1, flat.to(torch.float64), 0, step=3)
    got = parse(single.frames())
    assert got.dtype == DType.FLOAT32 and got.step == 3
    t = got.tensor().reshape(-1)
    assert t.dtype == torch.float32 and torch.equal(t[:5000], flat) and not t[5000:].any()
    frames = single.frames()
    assert len(frames[1]) * 2 == len(double.frames()[1])
    with pytest.raises(WireError, match="header says 32768"):  # one float32 value short
        parse([frames[0], bytes(frames[1])[:-4]])
    fields = list(HEADER.unpack(frames[0]))
    fields[2] = int(Kind.TRAIN_STATS)  # statistics stay FLOAT64
    with pytest.raises(WireError, match="TRAIN_STATS cannot carry FLOAT32"):
        parse([HEADER.pack(*fields), frames[1]])
