"""Wire format of model-block delivery: one fixed-layout header frame, then at most one payload frame.

A block is named by the SHA-256 of its bytes.  The receiver asks for a block's chunk digests
(``META_REQ`` -> ``META``) and for chunks by offset (``CHUNK_REQ`` -> ``CHUNK``), both at once: the
sender answers in the order asked, so digests come before the chunks they check.  A receiver that does
not know a block's size asks for its first chunk with the full chunk length; the ``CHUNK`` carries the
bytes there are and the block's ``total``.  ``MISSING`` says the sender does not hold the block,
``ERROR`` carries a short text.  As for the activation
messages (``testbed.wire.message``), nothing received is unpickled: the header is unpacked with
``struct`` and every field is checked before a payload is used.

Every message carries ``seq``: a request's number, which its reply echoes.

Kind       fields used                                 payload
---------  ------------------------------------------  --------------------------------------
META_REQ   digest, chunk_bytes                         none
META       digest, total, chunk_bytes                  SHA-256 of each chunk, ceil(total/chunk)x32 B
CHUNK_REQ  digest, offset, length, chunk_bytes         none
CHUNK      digest, offset, total, chunk_bytes          ``length`` bytes of the block at ``offset``
MISSING    digest                                      none
ERROR      digest (may be zero)                        utf-8 text, <= MAX_TEXT bytes
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from testbed.wire.payload import Frame, WireError

MAGIC = b"ELB\x01"
VERSION = 1
DIGEST_BYTES = 32
MIN_CHUNK = 1 << 10
MAX_CHUNK = 1 << 24  # 16 MiB
MAX_BLOCK = 1 << 36  # 64 GiB: far above any tensor of the models we cache
MAX_TEXT = 4096

# magic, version, kind, flags, digest, offset, total, length, chunk_bytes, seq
HEADER = struct.Struct("<4sBBH32sQQIIQ")


class Kind(IntEnum):
    META_REQ = 1
    META = 2
    CHUNK_REQ = 3
    CHUNK = 4
    MISSING = 5
    ERROR = 6


_HAS_PAYLOAD = {Kind.META, Kind.CHUNK, Kind.ERROR}


@dataclass
class BlockMessage:
    kind: Kind
    digest: bytes = bytes(DIGEST_BYTES)
    offset: int = 0
    total: int = 0
    length: int = 0
    chunk_bytes: int = 0
    payload: Frame = b""
    seq: int = 0  # a request's number, echoed by its reply (replies come in the order asked)

    @property
    def hexdigest(self) -> str:
        return self.digest.hex()

    def frames(self) -> list[Frame]:
        out: list[Frame] = [HEADER.pack(MAGIC, VERSION, int(self.kind), 0, self.digest, self.offset,
                                        self.total, self.length, self.chunk_bytes, self.seq)]
        if self.kind in _HAS_PAYLOAD:
            out.append(self.payload)
        return out

    def text(self) -> str:
        return bytes(memoryview(self.payload)).decode("utf-8", "replace")


def n_chunks(total: int, chunk_bytes: int) -> int:
    return math.ceil(total / chunk_bytes) if total else 0


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if not MIN_CHUNK <= chunk_bytes <= MAX_CHUNK:
        raise WireError(f"chunk size {chunk_bytes} outside [{MIN_CHUNK}, {MAX_CHUNK}]")


def parse(frames: Sequence[Frame]) -> BlockMessage:
    """Validate a received block message; ``WireError`` if anything is off."""
    if not frames:
        raise WireError("empty message")
    head = memoryview(frames[0]).cast("B")
    if head.nbytes != HEADER.size:
        raise WireError(f"header is {head.nbytes} bytes, expected {HEADER.size}")
    magic, version, kind, flags, digest, offset, total, length, chunk, seq = HEADER.unpack(head)
    if magic != MAGIC:
        raise WireError("bad magic")
    if version != VERSION:
        raise WireError(f"unsupported version {version}")
    try:
        kind = Kind(kind)
    except ValueError as e:
        raise WireError(str(e)) from None
    if flags:
        raise WireError(f"unknown flags {flags:#x}")
    want_frames = 2 if kind in _HAS_PAYLOAD else 1
    if len(frames) != want_frames:
        raise WireError(f"{kind.name}: {len(frames)} frames, expected {want_frames}")
    payload = frames[1] if want_frames == 2 else b""
    size = memoryview(payload).nbytes
    if total > MAX_BLOCK:
        raise WireError(f"block size {total} too large")
    if kind == Kind.META_REQ:
        _check_chunk_bytes(chunk)
        if offset or total or length:
            raise WireError("META_REQ: offset, total and length must be zero")
    elif kind == Kind.META:
        _check_chunk_bytes(chunk)
        if offset or length != size or size != n_chunks(total, chunk) * DIGEST_BYTES:
            raise WireError(f"META: {size} digest bytes do not fit {total} bytes in {chunk}-byte chunks")
    elif kind == Kind.CHUNK_REQ:
        _check_chunk_bytes(chunk)
        if total or not 0 < length <= chunk or offset % chunk:
            raise WireError(f"CHUNK_REQ: bad range offset={offset} length={length} chunk={chunk}")
    elif kind == Kind.CHUNK:
        _check_chunk_bytes(chunk)
        if offset % chunk or offset >= total:
            raise WireError(f"CHUNK: bad offset {offset} of {total}")
        if length != size or size != min(chunk, total - offset):
            raise WireError(f"CHUNK: {size} bytes at {offset}, expected {min(chunk, total - offset)}")
    elif kind == Kind.MISSING:
        if offset or total or length or chunk:
            raise WireError("MISSING: only the digest may be set")
    elif kind == Kind.ERROR and (size > MAX_TEXT or length != size):
        raise WireError("ERROR: bad text length")
    return BlockMessage(kind, digest, offset, total, length, chunk, payload, seq)


# ---- constructors -------------------------------------------------------------------------

def meta_request(digest: bytes, chunk_bytes: int) -> BlockMessage:
    return BlockMessage(Kind.META_REQ, digest, chunk_bytes=chunk_bytes)


def meta(digest: bytes, total: int, chunk_bytes: int, chunk_digests: bytes) -> BlockMessage:
    return BlockMessage(Kind.META, digest, 0, total, len(chunk_digests), chunk_bytes, chunk_digests)


def chunk_request(digest: bytes, offset: int, length: int, chunk_bytes: int) -> BlockMessage:
    return BlockMessage(Kind.CHUNK_REQ, digest, offset, 0, length, chunk_bytes)


def chunk(digest: bytes, offset: int, total: int, chunk_bytes: int, data: Frame) -> BlockMessage:
    return BlockMessage(Kind.CHUNK, digest, offset, total, memoryview(data).nbytes, chunk_bytes, data)


def missing(digest: bytes) -> BlockMessage:
    return BlockMessage(Kind.MISSING, digest)


def error(digest: bytes, text: str) -> BlockMessage:
    raw = text.encode("utf-8")[:MAX_TEXT]
    return BlockMessage(Kind.ERROR, digest, length=len(raw), payload=raw)
