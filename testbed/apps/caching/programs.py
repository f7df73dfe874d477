"""The caching node programs' bodies (entry points in ``nodes/``, started by ``testbed.apps.launch``)."""

from __future__ import annotations

import json
import signal
import threading

from testbed.apps.caching.blocks import BlockDir
from testbed.apps.caching.delivery import BlockServer
from testbed.apps.caching.settings import BlockNodeSettings
from testbed.apps.launch import announce_ready


def block_node(settings: BlockNodeSettings) -> int:
    """Serve a block folder until SIGTERM/SIGINT; then print the sender's counters as one JSON line."""
    blocks = BlockDir(settings.blocks)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def read(h: str) -> bytes | None:
        return blocks.get(h) if blocks.has(h) else None

    server = BlockServer(settings.bind, read)
    announce_ready(f"endpoint={server.endpoint}")
    try:
        server.serve(stop)
    finally:
        server.sock.close(linger=0)
    s = server.stats
    print(json.dumps({"requests": s.requests, "meta_sent": s.meta_sent, "chunks_sent": s.chunks_sent,
                      "chunk_bytes_sent": s.chunk_bytes_sent, "missing": s.missing,
                      "bad_requests": s.bad_requests}), flush=True)
    return 0
