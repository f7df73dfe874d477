"""Content-addressed blocks: one tensor (or one small file) named by the SHA-256 of its bytes.

A tensor block is the safetensors serialisation of that one tensor under the key ``tensor`` (the header
carries dtype and shape, and safetensors writes it deterministically), so a block is verified by hashing
the bytes as they lie on disk or arrive from the wire, without parsing them.  A file block (a model's
``config.json``, its tokenizer) is the file's bytes.

:class:`BlockDir` is a directory of blocks, ``DIR/ab/abcdef...`` (two-character fan-out); every write
goes to a temporary file in the same directory and is renamed into place after the hash is checked, so a
crash or a corrupted transfer never leaves a block with a wrong name.

Public API: ``block_hash``, ``encode_tensor``, ``decode_tensor``, ``BlockHashError``, ``BlockDir``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

TENSOR_KEY = "tensor"
_HASH = re.compile(r"[0-9a-f]{64}")


class BlockHashError(ValueError):
    """Bytes whose SHA-256 is not the name they were given (a corrupted chunk, a damaged file)."""


def block_hash(data: bytes | memoryview) -> str:
    """The block's name: SHA-256 of its bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def is_block_hash(text: str) -> bool:
    return isinstance(text, str) and _HASH.fullmatch(text) is not None


def encode_tensor(t: torch.Tensor) -> bytes:
    """One tensor as safetensors bytes (deterministic: the same tensor always gives the same block)."""
    from safetensors.torch import save

    return save({TENSOR_KEY: t.detach().contiguous().cpu()})


def decode_tensor(data: bytes) -> torch.Tensor:
    """The tensor of a tensor block (a copy owning its memory)."""
    from safetensors.torch import load

    return load(bytes(data))[TENSOR_KEY]


class BlockDir:
    """Blocks stored once each under ``root``; writes are verified and atomic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, h: str) -> Path:
        if not is_block_hash(h):
            raise BlockHashError(f"not a block name: {h!r}")
        return self.root / h[:2] / h

    def has(self, h: str) -> bool:
        return is_block_hash(h) and self.path(h).is_file()

    def size(self, h: str) -> int:
        return self.path(h).stat().st_size

    def get(self, h: str, verify: bool = False) -> bytes:
        """The block's bytes (FileNotFoundError if absent; BlockHashError if ``verify`` and damaged)."""
        data = self.path(h).read_bytes()
        if verify and block_hash(data) != h:
            raise BlockHashError(f"block {h[:12]}: bytes hash to {block_hash(data)[:12]}")
        return data

    def put(self, h: str, data: bytes | memoryview) -> bool:
        """Store ``data`` as block ``h`` after checking its hash; False if it was already there."""
        if block_hash(data) != h:
            raise BlockHashError(f"block {h[:12]}: bytes hash to {block_hash(data)[:12]}")
        target = self.path(h)
        if target.is_file():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def put_tensor(self, t: torch.Tensor) -> tuple[str, int]:
        """Store one tensor; returns its block name and size in bytes."""
        data = encode_tensor(t)
        h = block_hash(data)
        self.put(h, data)
        return h, len(data)

    def put_file(self, data: bytes) -> tuple[str, int]:
        h = block_hash(data)
        self.put(h, data)
        return h, len(data)

    def remove(self, h: str) -> int:
        """Delete block ``h``; the bytes freed (0 if it was not there)."""
        p = self.path(h)
        try:
            n = p.stat().st_size
            p.unlink()
            return n
        except FileNotFoundError:
            return 0

    def __iter__(self) -> Iterator[str]:
        """Names of the stored blocks (temporary files of interrupted writes are skipped)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    if is_block_hash(f.name):
                        yield f.name

    def clear_partial(self) -> int:
        """Remove temporary files left by interrupted writes (a crash mid-put); returns how many."""
        n = 0
        for tmp in self.root.glob("*/.tmp-*"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n
