"""The edge agent of an emulated ``cache-run``: one per edge, inside the edge's network namespace.

It owns the edge's :class:`~testbed.apps.caching.store.EdgeStore` and does what the driver (the policy's
caller, outside the network) tells it, one JSON line per step on stdin, one JSON line back on stdout:

    {"evict": [HASH...], "fetch": {SOURCE: [HASH...]}, "sizes": {SOURCE: [BYTES...]}, "store": [HASH...],
     "credit": {SOURCE: N}}
    -> {"elapsed_ms": ..., "written_ms": ..., "reports": {SOURCE: {bytes, received_s, elapsed_s, ...}},
        "used_bytes": ..., "evicted_bytes": ...}

Blocks named in ``evict`` leave the store first; then every source's blocks are fetched over the
emulated links in parallel (one :class:`~testbed.apps.caching.delivery.BlockFetcher` per source, kept
for the whole run: repository or a neighbouring edge's block node; ``sizes``, optional: each block's
size, from its manifest, so that every request of a fetch goes out at once; ``credit``, optional: the
most requests it keeps outstanding, its window being counted in bytes otherwise), each verified by the
fetcher and again by the store.  Blocks in
``store`` are written to the store; the others go to a scratch folder
from which the driver serves the request, emptied at the next step.  ``elapsed_ms`` is the wall time
of the delivery, the slowest source included: until every block is verified in this process's memory,
from which an edge serves at once (the request's fetch time); ``written_ms``: until the store has also
written them (atomically, each with an fsync: durability, which the request need not wait for, and the
host's disk, not the emulated network; the agent replies only once they are written).  The lines come from the
driver, this program's parent, through a pipe; they are JSON and checked, nothing is executed.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from testbed.apps.caching.blocks import BlockDir, is_block_hash
from testbed.apps.caching.delivery import DEFAULT_CHUNK, BlockFetcher
from testbed.apps.caching.store import EdgeStore
from testbed.apps.launch import announce_ready

MAX_CREDIT = 4096


@dataclass(frozen=True)
class EdgeAgentSettings:
    """An edge agent: its store (``store``, ``capacity_bytes``), its scratch folder, and the block
    nodes it may fetch from (parallel lists: name, ``tcp://`` endpoint, path rate and RTT)."""

    store: str
    scratch: str
    capacity_bytes: int
    sources: list[str]
    endpoints: list[str]
    rate_mbit: list[float]
    rtt_ms: list[float]
    chunk_bytes: int = DEFAULT_CHUNK

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.capacity_bytes <= 0:
            yield "capacity_bytes", "must be > 0"
        n = len(self.sources)
        for name in ("endpoints", "rate_mbit", "rtt_ms"):
            if len(getattr(self, name)) != n:
                yield name, f"must have one entry per source ({n})"
        if any(not e.startswith("tcp://") for e in self.endpoints):
            yield "endpoints", "must be tcp:// addresses"
        if any(r <= 0 for r in self.rate_mbit) or any(r < 0 for r in self.rtt_ms):
            yield "rate_mbit", "rates must be > 0 and RTTs >= 0"


def _hashes(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(h, str) and is_block_hash(h) for h in value):
        raise ValueError(f"{what}: must be a list of block hashes")
    return value


class EdgeAgent:
    def __init__(self, s: EdgeAgentSettings) -> None:
        self.store = EdgeStore(s.store, s.capacity_bytes)
        self.scratch_root = Path(s.scratch)
        self.scratch = BlockDir(self.scratch_root)
        self.lock = threading.Lock()
        self.keep: set[str] = set()
        self.fetchers = {name: BlockFetcher(ep, self._write, chunk_bytes=s.chunk_bytes, rate_mbit=rate,
                                            rtt_ms=rtt)
                         for name, ep, rate, rtt in zip(s.sources, s.endpoints, s.rate_mbit, s.rtt_ms,
                                                        strict=True)}
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.fetchers)))

    def _write(self, h: str, data: bytes) -> None:
        with self.lock:
            if h in self.keep:
                self.store.put(h, data)
            else:
                self.scratch.put(h, data)

    def step(self, cmd: dict) -> dict:
        shutil.rmtree(self.scratch_root, ignore_errors=True)
        self.scratch = BlockDir(self.scratch_root)
        freed = self.store.evict_all(_hashes(cmd.get("evict", []), "evict"))
        fetch = cmd.get("fetch", {})
        if not isinstance(fetch, dict) or any(src not in self.fetchers for src in fetch):
            raise ValueError(f"fetch: sources must be among {sorted(self.fetchers)}")
        self.keep = set(_hashes(cmd.get("store", []), "store"))
        credit = cmd.get("credit", {})
        ok = isinstance(credit, dict) and all(
            src in self.fetchers and isinstance(n, int) and 1 <= n <= MAX_CREDIT for src, n in credit.items())
        if not ok:
            raise ValueError(f"credit: must map sources to request counts in 1..{MAX_CREDIT}")
        for src, n in credit.items():
            self.fetchers[src].credit = n
        sizes = cmd.get("sizes", {})
        ok = isinstance(sizes, dict) and all(
            src in fetch and isinstance(ns, list) and len(ns) == len(fetch[src])
            and all(isinstance(n, int) and 0 <= n for n in ns) for src, ns in sizes.items())
        if not ok:
            raise ValueError("sizes: must map sources to one size in bytes per block fetched")
        t0 = time.perf_counter()

        def timed(src: str, hashes: list[str]):
            start = time.perf_counter()
            return start, self.fetchers[src].fetch(hashes, sizes.get(src))

        jobs = {src: self.pool.submit(timed, src, _hashes(hs, f"fetch.{src}"))
                for src, hs in fetch.items() if hs}
        reports, delivered = {}, 0.0
        for src, job in jobs.items():
            start, rep = job.result()
            delivered = max(delivered, start - t0 + rep.received_s)
            d = rep.to_dict()
            d.pop("per_block", None)
            reports[src] = d
        elapsed = (time.perf_counter() - t0) * 1e3
        return {"elapsed_ms": round(delivered * 1e3, 3), "written_ms": round(elapsed, 3), "reports": reports,
                "used_bytes": self.store.used_bytes, "evicted_bytes": freed}

    def close(self) -> None:
        self.pool.shutdown()
        for f in self.fetchers.values():
            f.close()


def edge_agent(settings: EdgeAgentSettings) -> int:
    """Serve steps from stdin until it closes (see the module's docstring); an error ends the agent
    with its message on stderr (the driver sees the pipe close)."""
    agent = EdgeAgent(settings)
    for f in agent.fetchers.values():
        f.wait_connected(10.0)  # the block nodes are up: a first fetch must not pay the connection's set-up
    announce_ready(f"store={settings.store}")
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            reply = agent.step(json.loads(line))
            print(json.dumps(reply), flush=True)
    finally:
        agent.close()
    return 0
