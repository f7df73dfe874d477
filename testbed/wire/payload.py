"""Frame layout of activation payloads: which frames an encoding sends, their element types and sizes.

This is the byte-level contract between two shards, so it lives with the message format: the
parser checks every received payload against it before a tensor is built, and
``testbed.model.codecs`` (how values are quantized and restored) fills and reads frames of exactly
this layout.  Nothing here knows tensors or the model; numpy views are all it hands out.

========  =====  ========================================================================
encoding  id     frames (N = tokens, i.e. the product of all but the last dim; H = hidden)
========  =====  ========================================================================
fp32      1      values ``<f4 [N, H]``
fp16      2      values ``<f2 [N, H]``
bf16      3      values ``<i2 [N, H]`` (bfloat16 bit patterns)
int8      4      values ``i1 [N, H]``, scales ``<f4 [N]``, outlier channels ``<u2 [N, K]``,
                 outlier values ``<f2 [N, K]``; K = min(OUTLIERS, H); H <= 65535
========  =====  ========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Frame = bytes | bytearray | memoryview

# one id per encoding of testbed.spec.options.CODECS (tests/wire keeps them in step)
CODEC_IDS: dict[str, int] = {"fp32": 1, "fp16": 2, "bf16": 3, "int8": 4}
OUTLIERS = 4  # int8: channels per token sent exactly (fp16), the largest |x| of that token
MAX_INT8_HIDDEN = 65535  # outlier channel indices travel as uint16

class WireError(ValueError):
    """A message that does not follow the wire format."""


@dataclass(frozen=True)
class Part:
    """One payload frame: its role, element type on the wire and element count."""

    name: str
    dtype: np.dtype
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def tokens_hidden(shape: Sequence[int]) -> tuple[int, int]:
    """(N, H) of an activation shape ``[.., T, H]``: H is the last dim, N the product of the others."""
    if len(shape) < 1 or any(int(s) < 0 for s in shape):
        raise WireError(f"bad activation shape {tuple(shape)}")
    return math.prod(int(s) for s in shape[:-1]), int(shape[-1])


def outliers(hidden: int) -> int:
    """K of the int8 layout for this hidden size."""
    return min(OUTLIERS, hidden)


_PLAIN = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<i2")}


def layout(codec: str, shape: Sequence[int]) -> list[Part]:
    """The frames an activation of ``shape`` occupies in ``codec``; WireError for an unknown codec."""
    n, h = tokens_hidden(shape)
    if codec in _PLAIN:
        return [Part("values", _PLAIN[codec], n * h)]
    if codec == "int8":
        if h > MAX_INT8_HIDDEN:
            raise WireError(f"int8 carries hidden sizes up to {MAX_INT8_HIDDEN} (got {h})")
        k = outliers(h)
        return [Part("values", np.dtype("i1"), n * h), Part("scales", np.dtype("<f4"), n),
                Part("channels", np.dtype("<u2"), n * k), Part("outliers", np.dtype("<f2"), n * k)]
    raise WireError(f"unknown codec {codec!r} (choose from {', '.join(CODEC_IDS)})")


def frame_sizes(codec: str, shape: Sequence[int]) -> list[int]:
    """Bytes of each frame of an activation of ``shape`` in ``codec``."""
    return [p.nbytes for p in layout(codec, shape)]


def bytes_per_token(codec: str, hidden: int) -> int:
    """Payload bytes one token position costs in ``codec``."""
    return sum(frame_sizes(codec, (1, hidden)))


def unpack(codec: str, frames: Sequence[Frame], shape: Sequence[int]) -> list[np.ndarray]:
    """Read-only numpy views of ``frames``, one per part of the layout, each size-checked."""
    parts = layout(codec, shape)
    if len(frames) != len(parts):
        raise WireError(f"{codec}: expected {len(parts)} payload frames, got {len(frames)}")
    out = []
    for part, frame in zip(parts, frames, strict=True):
        buf = memoryview(frame).cast("B")
        if buf.nbytes != part.nbytes:
            raise WireError(f"{codec} {part.name} frame has {buf.nbytes} bytes, expected {part.nbytes}")
        out.append(np.frombuffer(buf, dtype=part.dtype, count=part.count))
    return out
