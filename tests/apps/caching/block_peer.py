"""A sender or a receiver of blocks in a directory, for tests that run each end in its own namespace.

    block_peer.py serve ROOT BIND [--corrupt HEX:OFFSET ...]   # prints "ready ENDPOINT", then serves
    block_peer.py fetch ENDPOINT OUT --rate-mbit R --rtt-ms T [--chunk-kb K] HEX ...   # prints the report

``serve`` is the test's own sender: it flips a byte in the first send of each chunk named by
``--corrupt``, and on SIGTERM prints its counters as JSON.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from testbed.apps.caching.delivery import BlockFetcher, BlockServer


class Sender(BlockServer):
    def __init__(self, *a, corrupt: set[tuple[str, int]], **kw) -> None:
        super().__init__(*a, **kw)
        self.corrupt = corrupt
        self.sent: dict[str, int] = {}

    def chunk_payload(self, hexdigest, offset, data):
        key = f"{hexdigest}:{offset}"
        self.sent[key] = self.sent.get(key, 0) + 1
        if (hexdigest, offset) in self.corrupt:
            self.corrupt.discard((hexdigest, offset))
            bad = bytearray(data)
            bad[0] ^= 0xFF
            return bytes(bad)
        return data


def serve(args: argparse.Namespace) -> int:
    root = Path(args.root)
    corrupt = {(h, int(o)) for h, o in (c.split(":") for c in args.corrupt)}

    def read(h: str) -> bytes | None:
        path = root / h
        return path.read_bytes() if path.exists() else None

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    srv = Sender(args.bind, read, corrupt=corrupt)
    print("ready", srv.endpoint, flush=True)
    srv.serve(stop)
    srv.sock.close(linger=0)
    print(json.dumps({"chunks_sent": srv.stats.chunks_sent, "sent": srv.sent}), flush=True)
    return 0


def fetch(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with BlockFetcher(args.endpoint, lambda h, b: (out / h).write_bytes(b), chunk_bytes=args.chunk_kb * 1024,
                      rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms, give_up_s=30) as f:
        rep = f.fetch(args.blocks)
    print(json.dumps(rep.to_dict()), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("root")
    p.add_argument("bind")
    p.add_argument("--corrupt", action="append", default=[])
    p = sub.add_parser("fetch")
    p.add_argument("endpoint")
    p.add_argument("out")
    p.add_argument("--rate-mbit", type=float, required=True)
    p.add_argument("--rtt-ms", type=float, required=True)
    p.add_argument("--chunk-kb", type=int, default=128)
    p.add_argument("blocks", nargs="+")
    args = ap.parse_args()
    return serve(args) if args.cmd == "serve" else fetch(args)


if __name__ == "__main__":
    sys.exit(main())
