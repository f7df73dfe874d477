"""Activation codecs: how hidden states ``[.., T, H]`` float32 are quantized into frames and restored.

The frames themselves (how many, their element types and sizes) are the wire's layout,
``testbed.wire.payload``; a codec only computes the values that go in them.  ``int8`` is
per-token symmetric int8 plus the ``k`` largest-magnitude channels of each token sent exactly
in fp16: without those outliers, SmolLM2's residual stream loses greedy agreement almost entirely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from testbed.wire.payload import (
    Frame,
    WireError,
    bytes_per_token,
    frame_sizes,
    outliers,
    tokens_hidden,
    unpack,
)


class Codec(Protocol):
    name: str

    def encode(self, x: torch.Tensor) -> list[Frame]: ...
    def decode(self, frames: Sequence[Frame], shape: Sequence[int]) -> torch.Tensor: ...
    def bytes_per_token(self, hidden: int) -> int: ...
    def frame_sizes(self, shape: Sequence[int]) -> list[int]: ...


class _Layout:
    """Sizes come from the wire layout of the codec's name."""

    name: str

    def bytes_per_token(self, hidden: int) -> int:
        return bytes_per_token(self.name, hidden)

    def frame_sizes(self, shape: Sequence[int]) -> list[int]:
        return frame_sizes(self.name, shape)


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


@dataclass(frozen=True)
class PlainCodec(_Layout):
    """A straight cast: fp32 (exact), fp16 or bf16 (2 bytes per value)."""

    name: str
    dtype: torch.dtype

    def encode(self, x: torch.Tensor) -> list[Frame]:
        y = x.detach().to(self.dtype).contiguous()
        if self.dtype == torch.bfloat16:  # numpy has no bfloat16: its bit pattern travels as int16
            y = y.view(torch.int16)
        return [memoryview(y.numpy()).cast("B")]

    def decode(self, frames: Sequence[Frame], shape: Sequence[int]) -> torch.Tensor:
        (values,) = unpack(self.name, frames, shape)
        t = torch.from_numpy(values.copy())
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.to(torch.float32).reshape(_shape(shape))


@dataclass(frozen=True)
class Int8OutlierCodec(_Layout):
    """Per-token int8 with an fp32 scale; the ``k`` largest |x| channels of each token go in fp16."""

    name: str = "int8"

    def encode(self, x: torch.Tensor) -> list[Frame]:
        tokens, hidden = tokens_hidden(x.shape)
        frame_sizes(self.name, x.shape)  # refuses what the layout cannot carry
        flat = x.detach().to(torch.float32).reshape(tokens, hidden)
        k = outliers(hidden)
        idx = flat.abs().topk(k, dim=-1).indices if k else torch.empty(tokens, 0, dtype=torch.long)
        vals = flat.gather(-1, idx)
        rest = flat.scatter(-1, idx, 0.0)
        scale = (rest.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
        q = torch.round(rest / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return [
            memoryview(q.numpy()).cast("B"),
            memoryview(scale.contiguous().numpy()).cast("B"),
            memoryview(idx.to(torch.int32).numpy().astype(np.uint16)).cast("B"),
            memoryview(vals.to(torch.float16).contiguous().numpy()).cast("B"),
        ]

    def decode(self, frames: Sequence[Frame], shape: Sequence[int]) -> torch.Tensor:
        q, scale, idx, vals = unpack(self.name, frames, shape)
        tokens, hidden = tokens_hidden(shape)
        k = outliers(hidden)
        if k and idx.size and int(idx.max()) >= hidden:
            raise WireError("outlier channel index out of range")
        out = q.reshape(tokens, hidden).astype(np.float32) * scale.reshape(tokens, 1)
        if k:
            np.put_along_axis(out, idx.reshape(tokens, k).astype(np.int64),
                              vals.reshape(tokens, k).astype(np.float32), axis=-1)
        return torch.from_numpy(out).reshape(_shape(shape))


CODECS: dict[str, Codec] = {
    "fp32": PlainCodec("fp32", torch.float32),
    "fp16": PlainCodec("fp16", torch.float16),
    "bf16": PlainCodec("bf16", torch.bfloat16),
    "int8": Int8OutlierCodec(),
}


def get_codec(name: str) -> Codec:
    """The codec called ``name`` (fp32, fp16, bf16, int8); ValueError for any other."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (choose from {', '.join(CODECS)})") from None
