"""Activation codecs: exact byte sizes, round-trip error bounds, rejection of bad frames."""

from __future__ import annotations

import pytest
import torch

from testbed.model.codecs import get_codec


def _sizes(frames) -> int:
    return sum(memoryview(f).nbytes for f in frames)


@pytest.mark.parametrize(("name", "per_token"), [("fp32", 4 * 576), ("fp16", 2 * 576), ("bf16", 2 * 576),
                                                 ("int8", 576 + 4 + 4 * 4)])
def test_bytes_per_token_matches_encoded_size(name: str, per_token: int) -> None:
    codec = get_codec(name)
    x = torch.randn(1, 7, 576)
    assert codec.bytes_per_token(576) == per_token
    assert _sizes(codec.encode(x)) == 7 * per_token
    assert [memoryview(f).nbytes for f in codec.encode(x)] == codec.frame_sizes(x.shape)


def test_int8_size_for_the_smollm2_hidden() -> None:
    assert get_codec("int8").bytes_per_token(576) == 596


@pytest.mark.parametrize(("name", "rel"), [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3)])
def test_float_round_trip_error(name: str, rel: float) -> None:
    codec = get_codec(name)
    x = torch.randn(2, 5, 64) * 10
    y = codec.decode([bytes(f) for f in codec.encode(x)], x.shape)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.all((y - x).abs() <= rel * x.abs() + 1e-6)


def test_int8_round_trip_keeps_outliers_and_bounds_the_rest() -> None:
    codec = get_codec("int8")
    torch.manual_seed(0)
    x = torch.randn(1, 9, 576)
    x[..., 3] = 400.0  # massive activations, as in a real residual stream
    x[0, 2, 100] = -250.0
    y = codec.decode([bytes(f) for f in codec.encode(x)], x.shape)
    # outliers travel in fp16
    assert torch.allclose(y[..., 3], x[..., 3], rtol=1e-3)
    assert abs(float(y[0, 2, 100]) + 250.0) < 0.25
    # the rest: error at most half a quantization step of its own token's scale
    rest = x.clone()
    rest[..., 3] = 0
    rest[0, 2, 100] = 0
    step = rest.abs().amax(dim=-1, keepdim=True) / 127
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[..., 3] = False
    mask[0, 2, 100] = False
    assert torch.all(((y - x).abs() <= step * 0.5 + 1e-6)[mask])


def test_int8_zero_tokens_and_tiny_hidden() -> None:
    codec = get_codec("int8")
    x = torch.zeros(1, 3, 2)
    assert codec.bytes_per_token(2) == 2 + 4 + 8
    assert torch.equal(codec.decode(codec.encode(x), x.shape), x)


def test_decode_rejects_wrong_sizes_and_indices() -> None:
    x = torch.randn(1, 4, 64)
    fp16 = get_codec("fp16")
    with pytest.raises(ValueError):
        fp16.decode([bytes(fp16.encode(x)[0])[:-2]], x.shape)
    with pytest.raises(ValueError):
        fp16.decode([], x.shape)
    int8 = get_codec("int8")
    frames = [bytearray(bytes(f)) for f in int8.encode(x)]
    frames[2][0:2] = (1000).to_bytes(2, "little")  # outlier channel past the hidden size
    with pytest.raises(ValueError):
        int8.decode(frames, x.shape)


def test_unknown_codec() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("fp8")
