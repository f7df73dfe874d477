"""An edge node's block store: a disk tier with a byte capacity, plus a RAM tier for what is being served.

The disk tier is a :class:`~testbed.apps.caching.blocks.BlockDir`; ``put`` checks the bytes against the
block's name before anything is written and writes atomically, so a corrupted chunk is refused and a crash
leaves no half-written block (temporary files of an interrupted write are removed when the store opens).
The capacity is a hard limit: ``put`` beyond it raises :class:`StoreFull`; deciding what to evict is the
policy's job (:mod:`testbed.apps.caching.policies`), the store only does what it is told.

The RAM tier holds the blocks of the models being served (``load``); it has its own byte budget and drops
the least recently loaded models first.  Evicting a block from disk also drops it from RAM.

Public API: ``EdgeStore(root, capacity_bytes, ram_bytes=0)`` with ``has``, ``get``, ``put``, ``evict``,
``used_bytes``, ``free_bytes``, ``blocks``, ``load``, ``in_ram``, ``ram_used_bytes``; ``StoreFull``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from testbed.apps.caching.blocks import BlockDir, BlockHashError, block_hash
from testbed.spec.errors import TestbedError

__all__ = ["BlockHashError", "EdgeStore", "StoreFull"]


class StoreFull(TestbedError):
    """A put that would exceed the store's capacity (the policy should have evicted first)."""


class EdgeStore:
    def __init__(self, root: str | Path, capacity_bytes: int, ram_bytes: int = 0) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity must be > 0 bytes (got {capacity_bytes})")
        self.dir = BlockDir(root)
        self.capacity = int(capacity_bytes)
        self.ram_capacity = int(ram_bytes)
        self.dir.clear_partial()
        # sizes of what is on disk (a restarted edge keeps its blocks)
        self._sizes: dict[str, int] = {h: self.dir.size(h) for h in self.dir}
        self._used = sum(self._sizes.values())
        self._ram: OrderedDict[str, dict[str, bytes]] = OrderedDict()  # model -> its blocks' bytes

    # -- disk tier ------------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.capacity - self._used

    def blocks(self) -> set[str]:
        return set(self._sizes)

    def has(self, h: str) -> bool:
        return h in self._sizes

    def size(self, h: str) -> int:
        return self._sizes[h]

    def get(self, h: str) -> bytes:
        """The block's bytes, from RAM when a loaded model holds it (KeyError if not stored)."""
        for blocks in self._ram.values():
            if h in blocks:
                return blocks[h]
        if h not in self._sizes:
            raise KeyError(f"block {h[:12]} is not in this store")
        return self.dir.get(h)

    def put(self, h: str, data: bytes | memoryview) -> bool:
        """Store block ``h`` (hash checked first: BlockHashError, nothing written); False if already there.
        StoreFull if it does not fit."""
        if h in self._sizes:
            if block_hash(data) != h:
                raise BlockHashError(f"block {h[:12]}: bytes hash to {block_hash(data)[:12]}")
            return False
        n = len(data)
        if self._used + n > self.capacity:
            raise StoreFull(f"block {h[:12]} ({n} bytes) does not fit: {self._used} of {self.capacity} "
                            "bytes used")
        self.dir.put(h, data)
        self._sizes[h] = n
        self._used += n
        return True

    def evict(self, h: str) -> int:
        """Remove block ``h`` from disk and RAM; the bytes freed on disk (0 if it was not there)."""
        for blocks in self._ram.values():
            blocks.pop(h, None)
        n = self._sizes.pop(h, 0)
        if n:
            self.dir.remove(h)
            self._used -= n
        return n

    def evict_all(self, hashes: Iterable[str]) -> int:
        return sum(self.evict(h) for h in list(hashes))

    # -- RAM tier ---------------------------------------------------------------------------------------
    def load(self, model: str, hashes: Iterable[str]) -> dict[str, bytes]:
        """Hold ``model``'s blocks in RAM for serving (verified as read); least recently loaded models are
        dropped from RAM (not from disk) to stay within the RAM budget.  Returns hash -> bytes."""
        if model in self._ram:
            self._ram.move_to_end(model)
            return self._ram[model]
        blocks = {}
        for h in hashes:
            data = self.get(h)
            if block_hash(data) != h:
                raise BlockHashError(f"block {h[:12]} is damaged on disk")
            blocks[h] = data
        self._ram[model] = blocks
        while len(self._ram) > 1 and self.ram_used_bytes > self.ram_capacity:
            self._ram.popitem(last=False)
        return blocks

    def in_ram(self, model: str) -> bool:
        return model in self._ram

    @property
    def ram_used_bytes(self) -> int:
        """Bytes held in RAM; a block shared by two loaded models is counted once."""
        seen: dict[str, int] = {}
        for blocks in self._ram.values():
            for h, data in blocks.items():
                seen[h] = len(data)
        return sum(seen.values())

    def unload(self, model: str) -> None:
        self._ram.pop(model, None)
