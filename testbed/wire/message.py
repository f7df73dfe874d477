"""Wire format: one fixed-layout binary header frame, raw payload frames, optional hop records.

Nothing received is ever unpickled or evaluated: the header is unpacked with
``struct`` and checked field by field, and payload sizes must match the header (and, for
activations, the frame layout of their encoding, ``testbed.wire.payload``) exactly before
any array is built from them.  Turning activation frames into tensors and back is the
model's business (``testbed.model.codecs``); this module moves bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch

from testbed.wire.payload import CODEC_IDS, Frame, WireError, frame_sizes

MAGIC = b"ELM\x01"
VERSION = 1
MAX_NDIM = 4
MAX_FRAMES = 4
MAX_HOPS = 16
MAX_DIM = 1 << 20
MAX_ELEMENTS = 1 << 25
MAX_TEXT = 4096

# magic, version, kind, dtype, codec, flags, ndim, nframes, nhops,
# session, step, position_start, shape[4], frame bytes[4]
HEADER = struct.Struct("<4sBBBBHBBB3xQII4I4I")
# compute_ms, codec_ms, service_ms, downstream_ms, bytes_in, bytes_reply_in
HOP = struct.Struct("<ffffQQ")

FLAG_KV_CACHE = 1
KNOWN_FLAGS = FLAG_KV_CACHE


class Kind(IntEnum):
    FORWARD = 1
    RESULT = 2
    ERROR = 3
    CLOSE = 4
    CLOSED = 5
    PING = 6
    PONG = 7
    # ---- training (split LoRA fine-tuning): header step = training step, session = client,
    # position_start = micro-batch index (TRAIN_PULL: the hop asked) ----
    TRAIN_FORWARD = 16  # one micro-batch's activations, downstream (HIDDEN, the forward codec)
    TRAIN_LABELS = 17  # its labels [B, T], relayed to the stage that holds the loss (INT64)
    TRAIN_BACKWARD = 18  # gradient w.r.t. a stage's input activations, upstream (HIDDEN, the grad codec)
    TRAIN_STATS = 19  # request (NONE); reply: one row of step statistics per stage (FLOAT64 [stages, K])
    TRAIN_PULL = 20  # request (NONE): the adapter weights of hop ``position_start``
    TRAIN_WEIGHTS = 21  # reply: those weights, flat in the adapters' order (FLOAT64, zero-padded [R, C])
    TRAIN_SAMPLES = 22  # a frozen device's micro-batch: its sample ids [B] (INT64), the edge keeps its data
    TRAIN_OUTPUT = 23  # U-shaped: the last server's output activations, relayed up to the device (HIDDEN)
    TRAIN_HEAD_GRAD = 24  # U-shaped: the gradient of the loss w.r.t. them, relayed down (HIDDEN)
    # ---- recovery and KV budget (see the block at the end of this module) ----
    EVICTED = 8  # reply: this session's KV cache was evicted here; re-prefill it from position 0
    HOP_DOWN = 9  # reply: a hop below stopped answering; position_start = its distance (1: my next hop)
    REROUTE = 10  # control: step = hops still to travel, position_start = next-hop candidate to use


class DType(IntEnum):
    NONE = 0
    INT64 = 1  # token ids, counters
    HIDDEN = 2  # float32 activations, encoded by ``codec``
    TEXT = 3  # utf-8 error text
    FLOAT64 = 4  # float64 values: training statistics, losses
    FLOAT32 = 5  # float32 values: adapter weights (fp32 parameters, exact at half FLOAT64's bytes)


# which payload type each kind may carry
_KIND_DTYPES = {
    Kind.FORWARD: {DType.INT64, DType.HIDDEN},
    Kind.RESULT: {DType.INT64},
    Kind.ERROR: {DType.TEXT},
    Kind.CLOSE: {DType.NONE},
    Kind.CLOSED: {DType.NONE},
    Kind.PING: {DType.NONE},
    Kind.PONG: {DType.INT64},
    # training
    Kind.TRAIN_FORWARD: {DType.HIDDEN},
    Kind.TRAIN_LABELS: {DType.INT64},
    Kind.TRAIN_BACKWARD: {DType.HIDDEN},
    Kind.TRAIN_STATS: {DType.NONE, DType.FLOAT64},
    Kind.TRAIN_PULL: {DType.NONE},
    Kind.TRAIN_WEIGHTS: {DType.FLOAT32, DType.FLOAT64},
    Kind.TRAIN_SAMPLES: {DType.INT64},
    Kind.TRAIN_OUTPUT: {DType.HIDDEN},
    Kind.TRAIN_HEAD_GRAD: {DType.HIDDEN},
    Kind.EVICTED: {DType.NONE},
    Kind.HOP_DOWN: {DType.NONE},
    Kind.REROUTE: {DType.NONE},
}
_CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}


@dataclass
class Hop:
    """What one shard node measured for one request (milliseconds, bytes)."""

    compute_ms: float = 0.0
    codec_ms: float = 0.0
    service_ms: float = 0.0  # request received -> reply sent, downstream included
    downstream_ms: float = 0.0  # request forwarded -> reply from the next hop
    bytes_in: int = 0  # request bytes received from upstream
    bytes_reply_in: int = 0  # reply bytes received from downstream

    def pack(self) -> bytes:
        return HOP.pack(self.compute_ms, self.codec_ms, self.service_ms, self.downstream_ms,
                        self.bytes_in, self.bytes_reply_in)


@dataclass
class Message:
    kind: Kind
    session: int = 0
    step: int = 0
    position_start: int = 0
    dtype: DType = DType.NONE
    codec: str | None = None
    flags: int = 0
    shape: tuple[int, ...] = ()
    payload: list[Frame] = field(default_factory=list)
    hops: list[Hop] = field(default_factory=list)
    nbytes: int = 0  # total size on the wire (set by ``parse``)

    @property
    def kv_cache(self) -> bool:
        return bool(self.flags & FLAG_KV_CACHE)

    def tensor(self) -> torch.Tensor:
        """An INT64 payload (token ids, counters) as an int64 tensor, a FLOAT64 / FLOAT32 one as
        float64 / float32.

        Activations (HIDDEN) are decoded by their codec: ``testbed.model.codecs``."""
        if self.dtype == DType.INT64:
            arr = np.frombuffer(memoryview(self.payload[0]).cast("B"), dtype="<i8").copy()
            return torch.from_numpy(arr).reshape(self.shape)
        if self.dtype in (DType.FLOAT64, DType.FLOAT32):
            kind = "<f8" if self.dtype == DType.FLOAT64 else "<f4"
            arr = np.frombuffer(memoryview(self.payload[0]).cast("B"), dtype=kind).copy()
            return torch.from_numpy(arr).reshape(self.shape)
        raise WireError(f"{self.dtype.name} payload is not an integer tensor")

    def text(self) -> str:
        return bytes(memoryview(self.payload[0])).decode("utf-8", "replace") if self.payload else ""

    def frames(self) -> list[Frame]:
        """Header frame, payload frames, then a hop-record frame if there are hops."""
        if len(self.shape) > MAX_NDIM or len(self.payload) > MAX_FRAMES or len(self.hops) > MAX_HOPS:
            raise WireError("message too large for the header")
        sizes = [memoryview(f).nbytes for f in self.payload]
        header = HEADER.pack(
            MAGIC, VERSION, int(self.kind), int(self.dtype), CODEC_IDS[self.codec] if self.codec else 0,
            self.flags, len(self.shape), len(self.payload), len(self.hops),
            self.session, self.step, self.position_start,
            *(list(self.shape) + [0] * (MAX_NDIM - len(self.shape))),
            *(sizes + [0] * (MAX_FRAMES - len(sizes))),
        )
        out: list[Frame] = [header, *self.payload]
        if self.hops:
            out.append(b"".join(h.pack() for h in self.hops))
        return out


def _expected_sizes(dtype: DType, codec: str | None, shape: tuple[int, ...]) -> list[int]:
    n = math.prod(shape) if shape else 0
    if dtype == DType.NONE:
        if shape:
            raise WireError("an empty message has no shape")
        return []
    if dtype in (DType.INT64, DType.FLOAT64):
        return [8 * n]
    if dtype == DType.FLOAT32:
        return [4 * n]
    if dtype == DType.TEXT:
        if len(shape) != 1 or n > MAX_TEXT:
            raise WireError("bad text shape")
        return [n]
    if len(shape) < 2:
        raise WireError("hidden states need at least 2 dimensions")
    return frame_sizes(codec or "", shape)


def parse(frames: Sequence[Frame]) -> Message:
    """Validate a received multipart message and return it; ``WireError`` if anything is off."""
    if not frames:
        raise WireError("empty message")
    head = memoryview(frames[0]).cast("B")
    if head.nbytes != HEADER.size:
        raise WireError(f"header is {head.nbytes} bytes, expected {HEADER.size}")
    (magic, version, kind, dtype, codec_id, flags, ndim, nframes, nhops,
     session, step, pos, *rest) = HEADER.unpack(head)
    if magic != MAGIC:
        raise WireError("bad magic")
    if version != VERSION:
        raise WireError(f"unsupported version {version}")
    try:
        kind, dtype = Kind(kind), DType(dtype)
    except ValueError as e:
        raise WireError(str(e)) from None
    if dtype not in _KIND_DTYPES[kind]:
        raise WireError(f"{kind.name} cannot carry {dtype.name}")
    if flags & ~KNOWN_FLAGS:
        raise WireError(f"unknown flags {flags:#x}")
    if codec_id and codec_id not in _CODEC_NAMES:
        raise WireError(f"unknown codec {codec_id}")
    codec = _CODEC_NAMES.get(codec_id)
    if (dtype == DType.HIDDEN) != (codec is not None):
        raise WireError("a codec goes with hidden states and only with them")
    if ndim > MAX_NDIM or nframes > MAX_FRAMES or nhops > MAX_HOPS:
        raise WireError("ndim, frame or hop count out of range")
    shape_all, sizes_all = rest[:MAX_NDIM], rest[MAX_NDIM:]
    shape = tuple(shape_all[:ndim])
    if any(s > MAX_DIM for s in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise WireError(f"shape {shape} too large")
    if any(shape_all[ndim:]) or any(sizes_all[nframes:]):
        raise WireError("unused shape or size fields must be zero")
    expected = _expected_sizes(dtype, codec, shape)
    sizes = list(sizes_all[:nframes])
    if sizes != expected:
        raise WireError(f"payload sizes {sizes} do not match the shape (expected {expected})")
    if len(frames) != 1 + nframes + (1 if nhops else 0):
        raise WireError(f"{len(frames)} frames, header announces {1 + nframes + (1 if nhops else 0)}")
    payload = list(frames[1:1 + nframes])
    for i, (f, size) in enumerate(zip(payload, sizes, strict=True)):
        if memoryview(f).nbytes != size:
            raise WireError(f"payload frame {i} is {memoryview(f).nbytes} bytes, header says {size}")
    hops: list[Hop] = []
    if nhops:
        raw = memoryview(frames[-1]).cast("B")
        if raw.nbytes != nhops * HOP.size:
            raise WireError("hop records do not match the hop count")
        hops = [Hop(*HOP.unpack_from(raw, i * HOP.size)) for i in range(nhops)]
    nbytes = sum(memoryview(f).nbytes for f in frames)
    return Message(Kind(kind), session, step, pos, dtype, codec, flags, shape, payload, hops, nbytes)


def wire_size(frames: Sequence[Frame]) -> int:
    """Bytes a multipart message occupies (sum of its frames)."""
    return sum(memoryview(f).nbytes for f in frames)


# ---- constructors -------------------------------------------------------------------------

def forward_tokens(session: int, step: int, pos: int, ids: torch.Tensor, kv_cache: bool) -> Message:
    ids = ids.to(torch.int64).contiguous()
    return Message(Kind.FORWARD, session, step, pos, DType.INT64, None, FLAG_KV_CACHE if kv_cache else 0,
                   tuple(ids.shape), [memoryview(ids.numpy()).cast("B")])


def forward_hidden(session: int, step: int, pos: int, shape: Sequence[int], codec: str,
                   frames: list[Frame], kv_cache: bool) -> Message:
    """Activations of ``shape`` already encoded by ``codec`` into ``frames`` (its wire layout)."""
    shape = tuple(int(s) for s in shape)
    sizes = [memoryview(f).nbytes for f in frames]
    if sizes != frame_sizes(codec, shape):
        raise WireError(f"{codec} frames of {sizes} bytes do not fit shape {shape}")
    return Message(Kind.FORWARD, session, step, pos, DType.HIDDEN, codec, FLAG_KV_CACHE if kv_cache else 0,
                   shape, list(frames))


def result(session: int, step: int, token: int, hops: list[Hop]) -> Message:
    ids = np.array([token], dtype="<i8")
    return Message(Kind.RESULT, session, step, 0, DType.INT64, None, 0, (1,), [ids.tobytes()], hops)


def error(session: int, step: int, text: str) -> Message:
    raw = text.encode("utf-8")[:MAX_TEXT]
    return Message(Kind.ERROR, session, step, 0, DType.TEXT, None, 0, (len(raw),), [raw])


def control(kind: Kind, session: int = 0) -> Message:
    return Message(kind, session)


def pong(counters: list[int]) -> Message:
    arr = np.array(counters, dtype="<i8")
    return Message(Kind.PONG, 0, 0, 0, DType.INT64, None, 0, (len(counters),), [arr.tobytes()])


# ---- training constructors ----------------------------------------------------------------

def train_hidden(kind: Kind, session: int, step: int, micro: int, shape: Sequence[int], codec: str,
                 frames: list[Frame]) -> Message:
    """TRAIN_FORWARD / TRAIN_OUTPUT (activations) or TRAIN_BACKWARD / TRAIN_HEAD_GRAD (their gradient),
    already encoded by ``codec``."""
    if kind not in (Kind.TRAIN_FORWARD, Kind.TRAIN_BACKWARD, Kind.TRAIN_OUTPUT, Kind.TRAIN_HEAD_GRAD):
        raise WireError(f"{kind.name} does not carry activations")
    msg = forward_hidden(session, step, micro, shape, codec, frames, False)
    msg.kind = kind
    return msg


def train_labels(session: int, step: int, micro: int, labels: torch.Tensor) -> Message:
    labels = labels.to(torch.int64).contiguous()
    return Message(Kind.TRAIN_LABELS, session, step, micro, DType.INT64, None, 0, tuple(labels.shape),
                   [memoryview(labels.numpy()).cast("B")])


def float_values(kind: Kind, session: int, step: int, values: np.ndarray | Sequence[Sequence[float]],
                 micro: int = 0, single: bool = False) -> Message:
    """A FLOAT64 (``single``: FLOAT32) message (TRAIN_STATS reply, TRAIN_WEIGHTS) of a 1- or
    2-dimensional array."""
    arr = np.ascontiguousarray(np.asarray(values, dtype="<f4" if single else "<f8"))
    if arr.ndim not in (1, 2):
        raise WireError("float payloads are 1- or 2-dimensional")
    return Message(kind, session, step, micro, DType.FLOAT32 if single else DType.FLOAT64, None, 0,
                   tuple(arr.shape), [memoryview(arr).cast("B")])


# ---- recovery and KV budget -----------------------------------------------------------------
# A shard node that dropped a session's KV cache (its memory budget, or the idle timeout) answers
# EVICTED instead of an error: the client re-prefills the session from its token history.  A node
# whose next hop went away answers HOP_DOWN for the requests it relayed there, with the distance
# of the failed hop; each node on the way back adds one, so the client learns which stage failed.
# REROUTE tells the node ``step`` hops below the receiver to use next-hop candidate
# ``position_start`` (an index into the addresses of its settings: nothing on the wire names an
# address to connect to).

def evicted(session: int, step: int) -> Message:
    return Message(Kind.EVICTED, session, step)


def hop_down(session: int, step: int, distance: int) -> Message:
    return Message(Kind.HOP_DOWN, session, step, distance)


def reroute(distance: int, candidate: int, session: int = 0) -> Message:
    return Message(Kind.REROUTE, session, distance, candidate)


def pong_for(session: int, step: int, counters: list[int]) -> Message:
    """A PONG that names the PING it answers (a probe relayed down the chain)."""
    msg = pong(counters)
    msg.session, msg.step = session, step
    return msg
