"""Block delivery goodput on a shaped link (testbed/apps/caching/delivery.py), root only.

Two namespaces joined by the userspace link process (``netns_link``): a sender of random blocks in
one, the receiver in the other.  Cases, each repeated (median, min-max):

  steady   a 20 MB block over 50 Mbit/s, 20 ms each way (RTT 40 ms): goodput / link rate and
           elapsed / analytic bound (bytes / rate + 2 RTT)
  outages  the same block while the link drops everything twice for 1 s (the link's shaping set to
           100 % loss, then restored): goodput against the time the link was up
           (goal >= 80 %); chunks sent by the sender vs chunks in the block (nothing verified
           is fetched again: only lost requests and timeout probes are re-sent)

    .venv/bin/python bench/delivery_goodput.py [--repeats 3] [--mb 20] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RATE, DELAY = 50.0, 20.0
CHUNK = 128 * 1024
OUTAGES = ((1.0, 1.0), (2.5, 1.0))  # (start after the transfer began, length), seconds


def role_serve(root: Path, bind: str) -> int:
    from testbed.apps.caching.delivery import BlockServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    srv = BlockServer(bind, lambda h: (root / h).read_bytes() if (root / h).exists() else None)
    print("ready", flush=True)
    srv.serve(stop)
    print(json.dumps({"chunks_sent": srv.stats.chunks_sent}), flush=True)
    return 0


def role_fetch(endpoint: str, name: str, size: int) -> int:
    from testbed.apps.caching.delivery import BlockFetcher, credit_for

    factor = float(os.environ.get("BENCH_CREDIT_FACTOR", "0")) or None
    window = credit_for(RATE, 2 * DELAY, CHUNK, factor) * CHUNK if factor else None
    with BlockFetcher(endpoint, lambda h, b: None, chunk_bytes=CHUNK, rate_mbit=RATE, rtt_ms=2 * DELAY,
                      window_bytes=window, give_up_s=60) as f:
        # an edge keeps its connections to the senders open: a fetch starts on an established one
        t = time.monotonic()
        f.wait_connected(10.0)
        connect_s = time.monotonic() - t
        print("start", time.time(), flush=True)
        rep = f.fetch([name], [size])
    rep = {**rep.to_dict(), "connect_s": connect_s}
    rep.pop("per_block")
    print(json.dumps(rep), flush=True)
    return 0


def one_run(root: Path, name: str, nbytes: int, outages: bool) -> dict:
    from testbed.net import probe
    from testbed.net.shaping.userspace import netns_link, update_link_process
    from testbed.spec.topology import Shaping

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    s = Shaping(bw_mbit=RATE, delay_ms=DELAY)
    dead = Shaping(bw_mbit=RATE, delay_ms=DELAY, loss_pct=100.0)
    me = [sys.executable, str(Path(__file__).resolve())]
    with netns_link(s, s) as link:
        sender = link.run2([*me, "--role", "serve", str(root), f"tcp://{link.ip2}:5700"],
                           stdout=subprocess.PIPE, text=True, env=env)
        assert sender.stdout.readline().startswith("ready")
        recv = link.run1([*me, "--role", "fetch", f"tcp://{link.ip2}:5700", name, str(nbytes)],
                         stdout=subprocess.PIPE, text=True, env=env)
        t0 = float(recv.stdout.readline().split()[1])
        down_s = 0.0
        if outages:
            for start, length in OUTAGES:
                time.sleep(max(0.0, t0 + start - time.time()))
                update_link_process(link.proc, dead, dead)
                time.sleep(length)
                update_link_process(link.proc, s, s)
                down_s += length
        out, _ = recv.communicate(timeout=120)
        rep = json.loads(out.strip().splitlines()[-1])
        sender.send_signal(signal.SIGTERM)
        sent = json.loads(sender.communicate(timeout=10)[0].strip().splitlines()[-1])
        # what plain TCP (iperf3, cubic) gets on this link right now: the machine's load shows here too
        tcp = None if outages else probe.measure_throughput(link.run2, link.run1, link.ip1, 4)
    from testbed.apps.caching.analytic import framing_bytes
    from testbed.net.tcp_model import transfer_s

    up_s = rep["elapsed_s"] - down_s
    # replay's analytic model: one round trip, slow start from TCP's initial window, headers, framing
    model_s = transfer_s(nbytes + framing_bytes(nbytes, CHUNK), RATE, 2 * DELAY)
    return {"goodput_mbit": rep["goodput_mbit"], "of_rate": rep["goodput_mbit"] / RATE,
            "of_available": nbytes * 8 / up_s / 1e6 / RATE, "elapsed_s": rep["elapsed_s"],
            "bound_s": rep["bound_s"], "model_s": model_s, "bound_ratio": rep["bound_ratio"],
            "window_bytes": rep["window_bytes"],
            "connect_s": rep["connect_s"], "first_reply_s": rep["first_reply_s"],
            "chunks": -(-nbytes // CHUNK), "chunks_sent": sent["chunks_sent"],
            "rerequested": rep["rerequested"], "timeouts": rep["timeouts"], "duplicates": rep["duplicates"],
            "iperf_mbit": tcp}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["serve", "fetch"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.role == "serve":
        return role_serve(Path(a.args[0]), a.args[1])
    if a.role == "fetch":
        return role_fetch(a.args[0], a.args[1], int(a.args[2]))
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = os.urandom(int(a.mb * 1e6))
        name = hashlib.sha256(data).hexdigest()
        (root / name).write_bytes(data)
        runs: dict[str, list[dict]] = {"steady": [], "outages": []}
        for _ in range(a.repeats):
            for case in runs:
                runs[case].append(one_run(root, name, len(data), case == "outages"))
    load = (load_start, os.getloadavg()[0])  # 1-minute load average before and after: the machine's state
    if a.json:
        print(json.dumps({"rate_mbit": RATE, "rtt_ms": 2 * DELAY, "mb": a.mb, "load_avg": load,
                          "runs": runs}))
        return 0
    print(f"{a.mb:.0f} MB block, {RATE:.0f} Mbit/s, RTT {2 * DELAY:.0f} ms, chunk {CHUNK // 1024} KiB, "
          f"{a.repeats} repeats, load average {load[0]:.1f} before, {load[1]:.1f} after")
    tcp = [r["iperf_mbit"] for r in runs["steady"]]
    print(f"iperf3 TCP on the same link: {statistics.median(tcp):.1f} Mbit/s ({min(tcp):.1f}-{max(tcp):.1f})")
    print("| case | goodput Mbit/s | of link rate | of time up | elapsed / bound | elapsed / model "
          "| chunks sent / in block |")
    print("|---|---|---|---|---|---|---|")
    for case, rs in runs.items():
        def med(k: str, rs=rs) -> str:
            v = [r[k] for r in rs]
            return f"{statistics.median(v):.3g} ({min(v):.3g}-{max(v):.3g})"
        sent = "; ".join(f"{r['chunks_sent']}/{r['chunks']}" for r in rs)
        print(f"| {case} | {med('goodput_mbit')} | {med('of_rate')} | {med('of_available')} | "
              f"{statistics.median(r['elapsed_s'] / r['bound_s'] for r in rs):.3f} | "
              f"{statistics.median(r['elapsed_s'] / r['model_s'] for r in rs):.3f} | {sent} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
