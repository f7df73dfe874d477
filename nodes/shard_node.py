"""One shard node: load layers S:E, serve them over ZeroMQ, relay to the next hop.

    python nodes/shard_node.py --bind tcp://IP:PORT --model DIR --layers S:E \
        [--next tcp://IP:PORT] [--quant Q] [--threads 2] [--idle-timeout 60]

Prints ``READY <bind>`` on stdout once the shard is loaded and the socket bound;
exits cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys


def parse_layers(text: str) -> tuple[int, int]:
    start, _, end = text.partition(":")
    try:
        s, e = int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers: {text!r} is not START:END") from None
    if s < 0 or e <= s:
        raise argparse.ArgumentTypeError(f"--layers: {text!r} is not a non-empty range")
    return s, e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", required=True, help="tcp://IP:PORT (an address of this host; never 0.0.0.0)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", required=True, type=parse_layers)
    ap.add_argument("--next", default=None)
    ap.add_argument("--quant", default="none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--idle-timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    if "0.0.0.0" in args.bind or "*" in args.bind:
        ap.error("--bind must name one address of this host")
    threads = max(1, min(2, args.threads))

    import torch

    from testbed.apps.inference.shard_server import ShardServer
    from testbed.model.shard import Shard

    torch.set_num_threads(threads)
    start, end = args.layers
    shard = Shard.load(args.model, start, end, quant=args.quant, threads=threads)
    shard.eval()
    server = ShardServer(shard, args.bind, args.next, idle_timeout=args.idle_timeout)

    def stop(_sig: int, _frame: object) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY {args.bind} layers={start}:{end}", flush=True)
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
