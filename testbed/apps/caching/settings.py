"""Typed settings of the caching node programs (``nodes/block_node.py``).

The launcher sends them as JSON; :func:`testbed.apps.launch.decode_settings` checks the types and
then ``problems()`` names values out of range, so a program never starts on a bad one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_ADDR = re.compile(r"^tcp://[0-9A-Za-z.\-\[\]:]+:(\d{1,5})$")
MAX_THREADS = 1024


@dataclass(frozen=True)
class BlockNodeSettings:
    """A sender of the blocks in ``blocks`` (a block directory: the repository's catalogue
    ``blocks/``, or an edge's store) on ``bind``."""

    bind: str
    blocks: str
    threads: int = 1  # set by the launcher from its thread plan (the sender computes SHA-256 only)

    def problems(self) -> Iterator[tuple[str, str]]:
        m = _ADDR.match(self.bind)
        if not m or not 0 < int(m.group(1)) < 65536:
            yield "bind", "must be tcp://HOST:PORT with a port in 1..65535"
        if not Path(self.blocks).is_dir():
            yield "blocks", "must be a block folder"
        if not 1 <= self.threads <= MAX_THREADS:
            yield "threads", f"must be in 1..{MAX_THREADS}"
