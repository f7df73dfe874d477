"""Activation codecs: how hidden states ``[.., T, H]`` float32 travel between shards.

Each codec turns a tensor into a list of raw frames (zero-copy views where the
layout allows it) and back.  ``int8`` is per-token symmetric int8 plus the
``k`` largest-magnitude channels of each token sent exactly in fp16: without
those outliers, SmolLM2's residual stream loses greedy agreement almost entirely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

Frame = bytes | bytearray | memoryview
OUTLIERS = 4


class Codec(Protocol):
    name: str

    def encode(self, x: torch.Tensor) -> list[Frame]: ...
    def decode(self, frames: Sequence[Frame], shape: Sequence[int]) -> torch.Tensor: ...
    def bytes_per_token(self, hidden: int) -> int: ...
    def frame_sizes(self, shape: Sequence[int]) -> list[int]: ...


def _tokens_hidden(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 1 or any(int(s) < 0 for s in shape):
        raise ValueError(f"bad activation shape {tuple(shape)}")
    hidden = int(shape[-1])
    tokens = int(np.prod([int(s) for s in shape[:-1]], dtype=np.int64)) if len(shape) > 1 else 1
    return tokens, hidden


def _view(frame: Frame, dtype: np.dtype, count: int) -> np.ndarray:
    buf = memoryview(frame).cast("B")
    want = count * np.dtype(dtype).itemsize
    if buf.nbytes != want:
        raise ValueError(f"frame has {buf.nbytes} bytes, expected {want}")
    return np.frombuffer(buf, dtype=dtype, count=count)


def _check_frames(frames: Sequence[Frame], n: int) -> None:
    if len(frames) != n:
        raise ValueError(f"expected {n} payload frames, got {len(frames)}")


@dataclass(frozen=True)
class PlainCodec:
    """A straight cast: fp32 (exact), fp16 or bf16 (2 bytes per value)."""

    name: str
    dtype: torch.dtype

    def _wire_np(self) -> np.dtype:
        # numpy has no bfloat16: its bit pattern travels as int16.
        return np.dtype(np.int16) if self.dtype == torch.bfloat16 else np.dtype(
            {torch.float32: np.float32, torch.float16: np.float16}[self.dtype])

    def encode(self, x: torch.Tensor) -> list[Frame]:
        y = x.detach().to(self.dtype).contiguous()
        if self.dtype == torch.bfloat16:
            y = y.view(torch.int16)
        return [memoryview(y.numpy()).cast("B")]

    def decode(self, frames: Sequence[Frame], shape: Sequence[int]) -> torch.Tensor:
        _check_frames(frames, 1)
        tokens, hidden = _tokens_hidden(shape)
        arr = _view(frames[0], self._wire_np(), tokens * hidden).copy()
        t = torch.from_numpy(arr)
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.to(torch.float32).reshape(tuple(int(s) for s in shape))

    def bytes_per_token(self, hidden: int) -> int:
        return hidden * self.dtype.itemsize

    def frame_sizes(self, shape: Sequence[int]) -> list[int]:
        tokens, hidden = _tokens_hidden(shape)
        return [tokens * self.bytes_per_token(hidden)]


@dataclass(frozen=True)
class Int8OutlierCodec:
    """Per-token int8 with an fp32 scale; the ``k`` largest |x| channels go in fp16.

    Frames: int8 values ``[N, H]``, fp32 scales ``[N]``, uint16 outlier channel
    indices ``[N, k]``, fp16 outlier values ``[N, k]``.
    """

    name: str = "int8"
    k: int = OUTLIERS

    def _k(self, hidden: int) -> int:
        return min(self.k, hidden)

    def encode(self, x: torch.Tensor) -> list[Frame]:
        tokens, hidden = _tokens_hidden(x.shape)
        if hidden > 65535:
            raise ValueError("int8 codec supports hidden sizes up to 65535")
        flat = x.detach().to(torch.float32).reshape(tokens, hidden)
        k = self._k(hidden)
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
        _check_frames(frames, 4)
        tokens, hidden = _tokens_hidden(shape)
        k = self._k(hidden)
        q = _view(frames[0], np.int8, tokens * hidden)
        scale = _view(frames[1], np.float32, tokens)
        idx = _view(frames[2], np.uint16, tokens * k)
        if k and idx.size and int(idx.max()) >= hidden:
            raise ValueError("outlier channel index out of range")
        vals = _view(frames[3], np.float16, tokens * k)
        out = q.reshape(tokens, hidden).astype(np.float32) * scale.reshape(tokens, 1)
        if k:
            np.put_along_axis(out, idx.reshape(tokens, k).astype(np.int64),
                              vals.reshape(tokens, k).astype(np.float32), axis=-1)
        return torch.from_numpy(out).reshape(tuple(int(s) for s in shape))

    def bytes_per_token(self, hidden: int) -> int:
        return hidden + 4 + 4 * self._k(hidden)

    def frame_sizes(self, shape: Sequence[int]) -> list[int]:
        tokens, hidden = _tokens_hidden(shape)
        k = self._k(hidden)
        return [tokens * hidden, tokens * 4, tokens * k * 2, tokens * k * 2]


CODECS: dict[str, Codec] = {
    "fp32": PlainCodec("fp32", torch.float32),
    "fp16": PlainCodec("fp16", torch.float16),
    "bf16": PlainCodec("bf16", torch.bfloat16),
    "int8": Int8OutlierCodec(),
}
CODEC_IDS: dict[str, int] = {"fp32": 1, "fp16": 2, "bf16": 3, "int8": 4}


def get_codec(name: str) -> Codec:
    """The codec called ``name`` (fp32, fp16, bf16, int8); ValueError for any other."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (choose from {', '.join(CODECS)})") from None
