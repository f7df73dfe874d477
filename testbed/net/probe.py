"""Link measurements with iperf3 and ping between two endpoints of an emulated network.

A *runner* starts an argv inside one endpoint's namespace and returns the Popen; it accepts
Popen keyword arguments (``stdout=PIPE`` ...).  Mininet's ``host.popen`` fits, and so does
``lambda argv, **kw: subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)``.

Throughput is TCP goodput (cubic, first second omitted) as the receiver counts it; loss and
timelines use UDP and the server's (receiver's) counters.  Every iperf3 server started here
serves one test (``-1``) on its own port and is killed if it is still there afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

from testbed.spec.errors import TestbedError

Runner = Callable[..., subprocess.Popen]

UDP_PAYLOAD = 1448  # bytes: one datagram per 1500-byte IP packet, never fragmented
CONNECT_TRIES = 40
UDP_START_TRIES = 4
_ports = itertools.count((os.getpid() * 37) % 20000)
_PING_TIME = re.compile(rb"time=([0-9.]+) ms")


class ProbeError(TestbedError, RuntimeError):
    """A measurement tool failed (its last message is in the text)."""


def _next_port() -> int:
    return 6000 + next(_ports) % 20000


def _wait_out(p: subprocess.Popen, timeout: float) -> bytes:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return out or b""


@contextlib.contextmanager
def _iperf_server(run: Runner) -> Iterator[int]:
    """A one-off iperf3 server on a fresh port; yields the port, kills the server at the end."""
    port = _next_port()
    srv = run(["iperf3", "-s", "-1", "-J", "-p", str(port)], stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


def _iperf_client(run: Runner, argv: list[str], seconds: float) -> dict[str, Any]:
    """Run an iperf3 client (-J), retrying while the server is not listening yet."""
    last = ""
    for _ in range(CONNECT_TRIES):
        p = run(["iperf3", "-J", "--get-server-output", *argv], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)
        out = _wait_out(p, seconds + 30)
        try:
            data = json.loads(out)
        except ValueError:
            data = {"error": out.decode(errors="replace").strip()[-200:]}
        err = data.get("error")
        if not err and p.returncode == 0:
            return data
        last = str(err or f"exit code {p.returncode}")
        if "refused" not in last:  # only a server not listening yet is worth a retry
            break
        time.sleep(0.1)
    raise ProbeError(f"iperf3 {' '.join(argv)}: {last}")


def measure_throughput(src_run: Runner, dst_run: Runner, dst_ip: str, seconds: float) -> float:
    """TCP (cubic) goodput src -> dst in Mbit/s, as received, after a 1 s omitted warm-up.

    It counts the receiver's whole one-second intervals only: the tail interval after the
    sender stops would otherwise charge the data still queued in the link (bufferbloat) as
    missing throughput."""
    secs = max(1, math.ceil(seconds))
    with _iperf_server(dst_run) as port:
        data = _iperf_client(src_run, ["-c", dst_ip, "-p", str(port), "-t", str(secs), "-O", "1",
                                       "-C", "cubic"], secs + 1)
    full = [iv["sum"] for iv in (data.get("server_output_json") or {}).get("intervals", [])
            if not iv["sum"].get("omitted") and iv["sum"]["seconds"] > 0.5]
    if not full:
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6
    return sum(iv["bytes"] for iv in full) * 8 / sum(iv["seconds"] for iv in full) / 1e6


def _udp(src_run: Runner, dst_run: Runner, dst_ip: str, rate_mbit: float, seconds: float) -> dict:
    secs = max(1, math.ceil(seconds))
    for attempt in range(UDP_START_TRIES):
        try:
            with _iperf_server(dst_run) as port:
                data = _iperf_client(src_run, ["-c", dst_ip, "-p", str(port), "-u", "-b", f"{rate_mbit}M",
                                               "-l", str(UDP_PAYLOAD), "-t", str(secs)], secs)
            break
        except ProbeError as e:
            # iperf3 starts a UDP test with one datagram each way; a lossy link may drop one,
            # and the client then fails reading its "stream socket": start again, fresh server
            if "stream socket" not in str(e) or attempt == UDP_START_TRIES - 1:
                raise
    server = data.get("server_output_json")
    if not server:
        raise ProbeError("iperf3 returned no server-side results")
    return server


def measure_loss(src_run: Runner, dst_run: Runner, dst_ip: str, rate_mbit: float, seconds: float) -> float:
    """Per cent of UDP datagrams (sent at ``rate_mbit``, below capacity) the receiver missed."""
    server = _udp(src_run, dst_run, dst_ip, rate_mbit, seconds)
    return float(server["end"]["sum"]["lost_percent"])


def measure_timeline(src_run: Runner, dst_run: Runner, dst_ip: str, rate_mbit: float,
                     seconds: float) -> list[float]:
    """A UDP flow at ``rate_mbit`` (saturating): Mbit/s received in each second at the server."""
    server = _udp(src_run, dst_run, dst_ip, rate_mbit, seconds)
    per_s = [float(iv["sum"]["bits_per_second"]) / 1e6 for iv in server["intervals"]
             if iv["sum"]["seconds"] > 0.5]
    return per_s[:max(1, math.ceil(seconds))]  # later seconds only drain the link's queue


def measure_rtt(src_run: Runner, dst_ip: str, count: int = 20, interval: float = 0.05) -> dict[str, float]:
    """Ping RTT statistics in ms (avg/min/max/mdev) over ``count`` replies.

    One extra ping goes first and is not counted: it may include address resolution."""
    p = src_run(["ping", "-n", "-c", str(count + 1), "-i", str(interval), "-W", "2", dst_ip],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = _wait_out(p, (count + 1) * interval + 30)
    times = [float(m) for m in _PING_TIME.findall(out)]
    if out.count(b"icmp_seq=1 ") and times:
        times = times[1:]
    if not times:
        raise ProbeError(f"ping {dst_ip}: no reply ({out.decode(errors='replace').strip()[-200:]})")
    avg = sum(times) / len(times)
    mdev = math.sqrt(max(sum(t * t for t in times) / len(times) - avg * avg, 0.0))
    return {"avg": avg, "min": min(times), "max": max(times), "mdev": mdev, "replies": len(times)}


def _loss_rate(measured_mbit: float, hint: float | None) -> float:
    """A UDP rate safely below capacity: half the measured goodput (or of the hint)."""
    base = hint if hint is not None else measured_mbit
    return max(round(base * 0.5, 3), 0.1)


def probe(src_run: Runner, dst_run: Runner, src_ip: str, dst_ip: str, seconds: float,
          timeline: bool = False, up_hint_mbit: float | None = None,
          down_hint_mbit: float | None = None) -> dict[str, Any]:
    """Throughput both ways, RTT, UDP loss both ways (and optional per-second timelines).

    Up is src -> dst, down is dst -> src; ``rtt_ms`` is the mean RTT (``rtt`` has all the
    ping figures).  The tests run one after another."""
    res: dict[str, Any] = {}
    res["up_mbit"] = measure_throughput(src_run, dst_run, dst_ip, seconds)
    res["down_mbit"] = measure_throughput(dst_run, src_run, src_ip, seconds)
    res["rtt"] = measure_rtt(src_run, dst_ip)
    res["rtt_ms"] = res["rtt"]["avg"]
    res["loss_up_pct"] = measure_loss(src_run, dst_run, dst_ip,
                                      _loss_rate(res["up_mbit"], up_hint_mbit), seconds)
    res["loss_down_pct"] = measure_loss(dst_run, src_run, src_ip,
                                        _loss_rate(res["down_mbit"], down_hint_mbit), seconds)
    if timeline:
        up_sat = 1.5 * (up_hint_mbit or res["up_mbit"])
        down_sat = 1.5 * (down_hint_mbit or res["down_mbit"])
        res["up_timeline"] = measure_timeline(src_run, dst_run, dst_ip, up_sat, seconds)
        res["down_timeline"] = measure_timeline(dst_run, src_run, src_ip, down_sat, seconds)
    return res
