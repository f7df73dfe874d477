"""Link measurements with iperf3 and ping between two endpoints of an emulated network.

A *runner* starts an argv inside one endpoint's namespace and returns the Popen; it accepts
Popen keyword arguments (``stdout=PIPE`` ...).  Mininet's ``host.popen`` fits, and so does
``lambda argv, **kw: subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)``.

Throughput is TCP goodput (cubic, first second omitted) as the receiver counts it; loss and
timelines use UDP and the server's (receiver's) counters.  Every iperf3 server started here
serves one test (``-1``) on its own port and is killed if it is still there afterwards.

Every test has a deadline (its duration plus ``grace_s``, at least ``GRACE_S``).  A test that
misses it (a trace with a long outage stalls a test) is stopped and reports what the receiver
counted until then, with a note saying so: the server is stopped with SIGTERM, on which iperf3
writes its intervals so far.  Functions given a ``notes`` list append such notes to it (and a
ping without a reply becomes a note too); without one, a stalled test is a ``ProbeError``.
Every other failure (a tool that exits with an error) is a ``ProbeError`` whose text is one line.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from testbed.hosts.machine_load import cpu_times, load_between, timer_late_us
from testbed.spec.errors import TestbedError

Runner = Callable[..., subprocess.Popen]

UDP_PAYLOAD = 1448  # bytes: one datagram per 1500-byte IP packet, never fragmented
CONNECT_TRIES = 40
UDP_START_TRIES = 4
GRACE_S = 10  # how long a test may take beyond its own duration (or its duration, if longer)
SERVER_STOP_S = 5  # how long a stopped iperf3 server may take to write its results
# UDP receive buffer asked for: the default (~200 KB, ~15 ms at 100 Mbit/s) overflows whenever the
# receiving iperf3 waits that long for a core on a busy machine, which reads as link loss
UDP_RCVBUF = 4 << 20
_ports = itertools.count((os.getpid() * 37) % 20000)
_PING_TIME = re.compile(rb"time=([0-9.]+) ms")


class ProbeError(TestbedError, RuntimeError):
    """A measurement tool failed (its last message is in the text)."""


def _next_port() -> int:
    return 6000 + next(_ports) % 20000


def _wait_out(p: subprocess.Popen, timeout: float) -> tuple[bytes, bool]:
    """The process's output, and whether it finished by itself within ``timeout``."""
    try:
        out, _ = p.communicate(timeout=timeout)
        return out or b"", True
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        return out or b"", False


def deadline_s(seconds: float, grace_s: float = GRACE_S) -> float:
    """How long a test of ``seconds`` may run before it counts as stalled."""
    return seconds + max(grace_s, seconds)


class _Server:
    """A one-off iperf3 server (-J) on a fresh port; ``results()`` stops it and reads its JSON."""

    def __init__(self, run: Runner) -> None:
        self.port = _next_port()
        self.out = tempfile.TemporaryFile()  # a file, not a pipe: a long test's JSON never blocks it
        self.proc = run(["iperf3", "-s", "-1", "-J", "-p", str(self.port)], stdout=self.out,
                        stderr=subprocess.DEVNULL)

    def results(self) -> dict[str, Any]:
        """Its JSON: iperf3 writes the intervals it counted when SIGTERM stops it mid-test
        ({} if it wrote nothing readable)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
        _wait_out(self.proc, SERVER_STOP_S)
        self.out.seek(0)
        try:
            data = json.loads(self.out.read())
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.out.close()


@contextlib.contextmanager
def _iperf_server(run: Runner) -> Iterator[_Server]:
    """A one-off iperf3 server; yields it, kills it at the end."""
    srv = _Server(run)
    try:
        yield srv
    finally:
        srv.close()


@dataclass(frozen=True)
class IperfRun:
    """One iperf3 client run: its JSON and when (``time.monotonic()``) it was started and ended.

    ``stalled``: it missed its deadline and was stopped; ``data`` is then the server's JSON
    up to that moment (its intervals; no ``end`` totals to trust)."""

    data: dict[str, Any]
    launched: float
    finished: float
    stalled: bool = False
    why: str = ""  # how a stalled run ended, for its note


def _stall_note(argv: list[str], deadline: float) -> str:
    return (f"iperf3 {' '.join(argv)}: no result within {deadline:.0f} s, stopped (the path carried "
            "(almost) nothing for that long: an outage in a trace?)")


def _iperf_client(run: Runner, argv: list[str], seconds: float, server: _Server | None = None,
                  grace_s: float = GRACE_S) -> IperfRun:
    """Run an iperf3 client (-J), retrying while the server is not listening yet.

    Past its deadline the client is stopped: with ``server`` the run comes back ``stalled`` with
    the server's intervals so far, without one it is a ProbeError."""
    last = ""
    deadline = deadline_s(seconds, grace_s)
    for _ in range(CONNECT_TRIES):
        launched = time.monotonic()
        p = run(["iperf3", "-J", "--get-server-output", *argv], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)
        out, in_time = _wait_out(p, deadline)
        finished = time.monotonic()
        if not in_time:
            if server is not None:
                return IperfRun(server.results(), launched, finished, True,
                                f"stopped at its deadline ({deadline:.0f} s): the path carried (almost) "
                                "nothing for that long (an outage?)")
            raise ProbeError(_stall_note(argv, deadline))
        try:
            data = json.loads(out)
        except ValueError:
            data = {"error": out.decode(errors="replace").strip()[-200:]}
        err = data.get("error")
        if not err and p.returncode == 0:
            return IperfRun(data, launched, finished)
        last = str(err or f"exit code {p.returncode}")
        if server is not None and "No route to host" in last:
            # the neighbour's address did not resolve: over a long outage its ARP entry expires
            return IperfRun(server.results(), launched, finished, True,
                            "could not start: no route to host (address resolution got no answer: the "
                            "path is out?)")
        if "refused" not in last:  # only a server not listening yet is worth a retry
            break
        time.sleep(0.1)
    raise ProbeError(f"iperf3 {' '.join(argv)}: {' '.join(last.split())}")


def _received(intervals: Any) -> list[dict[str, Any]]:
    """The whole, not omitted, one-second intervals of a server's JSON."""
    out = []
    for iv in intervals if isinstance(intervals, list) else []:
        s = iv.get("sum") if isinstance(iv, dict) else None
        if isinstance(s, dict) and not s.get("omitted") and s.get("seconds", 0) > 0.5:
            out.append(s)
    return out


def throughput_intervals(src_run: Runner, dst_run: Runner, dst_ip: str, seconds: float,
                         notes: list[str] | None = None, grace_s: float = GRACE_S) -> list[float]:
    """TCP (cubic) goodput src -> dst in Mbit/s, per whole second the receiver counted, after
    a 1 s omitted warm-up.  A stalled test (``notes`` given): the seconds counted until its
    deadline ([0.0] if none), and a note."""
    secs = max(1, math.ceil(seconds))
    argv = ["-c", dst_ip, "-t", str(secs), "-O", "1", "-C", "cubic"]
    with _iperf_server(dst_run) as srv:
        got = _iperf_client(src_run, [*argv[:2], "-p", str(srv.port), *argv[2:]], secs + 1,
                            srv if notes is not None else None, grace_s)
    data = got.data
    if got.stalled:
        assert notes is not None
        per_s = [iv["bytes"] * 8 / iv["seconds"] / 1e6 for iv in _received(data.get("intervals"))]
        notes.append(f"TCP test {got.why}; the receiver counted {len(per_s)} whole second(s)"
                     + (f", mean {sum(per_s) / len(per_s):.3g} Mbit/s" if per_s else ""))
        return per_s or [0.0]
    try:
        full = [iv["sum"] for iv in (data.get("server_output_json") or {}).get("intervals", [])
                if not iv["sum"].get("omitted") and iv["sum"]["seconds"] > 0.5]
        if not full:
            return [float(data["end"]["sum_received"]["bits_per_second"]) / 1e6]
        return [iv["bytes"] * 8 / iv["seconds"] / 1e6 for iv in full]
    except (KeyError, TypeError) as e:
        raise ProbeError(f"iperf3 -c {dst_ip}: results without {e}") from None


def measure_throughput(src_run: Runner, dst_run: Runner, dst_ip: str, seconds: float,
                       notes: list[str] | None = None, grace_s: float = GRACE_S) -> float:
    """TCP (cubic) goodput src -> dst in Mbit/s, as received, after a 1 s omitted warm-up.

    It counts the receiver's whole one-second intervals only: the tail interval after the
    sender stops would otherwise charge the data still queued in the link (bufferbloat) as
    missing throughput.  ``notes``: see ``throughput_intervals``."""
    per_s = throughput_intervals(src_run, dst_run, dst_ip, seconds, notes, grace_s)
    return sum(per_s) / len(per_s)


def _udp_window() -> int:
    """``UDP_RCVBUF``, or what ``net.core.rmem_max`` allows (iperf3 fails when it gets less)."""
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return min(UDP_RCVBUF, int(f.read()))
    except (OSError, ValueError):
        return 0


def _udp(src_run: Runner, dst_run: Runner, dst_ip: str, rate_mbit: float, seconds: float,
         tolerate_stall: bool = False, grace_s: float = GRACE_S) -> IperfRun:
    """A UDP test; its ``data`` is the server's (receiver's) JSON (``stalled``: up to the deadline)."""
    secs = max(1, math.ceil(seconds))
    window = _udp_window()
    extra = ["-w", str(window)] if window else []
    for attempt in range(UDP_START_TRIES):
        try:
            with _iperf_server(dst_run) as srv:
                got = _iperf_client(src_run, ["-c", dst_ip, "-p", str(srv.port), "-u", "-b", f"{rate_mbit}M",
                                              "-l", str(UDP_PAYLOAD), "-t", str(secs), *extra], secs,
                                    srv if tolerate_stall else None, grace_s)
            if got.stalled:
                return got
            break
        except ProbeError as e:
            # iperf3 starts a UDP test with one datagram each way; a lossy link may drop one,
            # and the client then fails reading its "stream socket": start again, fresh server
            if "stream socket" not in str(e) or attempt == UDP_START_TRIES - 1:
                raise
    server = got.data.get("server_output_json")
    if not server or "end" not in server or "intervals" not in server:
        raise ProbeError(f"iperf3 -c {dst_ip} -u: no server-side results")
    return IperfRun(server, got.launched, got.finished)


def measure_loss(src_run: Runner, dst_run: Runner, dst_ip: str, rate_mbit: float, seconds: float,
                 notes: list[str] | None = None, grace_s: float = GRACE_S) -> float:
    """Per cent of UDP datagrams (sent at ``rate_mbit``, below capacity) the receiver missed.

    A stalled test (``notes`` given): the sender's count never came back, so the loss is
    estimated from the datagrams the receiver got against those the sender paces out at
    ``rate_mbit`` in the test's duration, with a note."""
    got = _udp(src_run, dst_run, dst_ip, rate_mbit, seconds, notes is not None, grace_s)
    if got.stalled:
        assert notes is not None
        secs = max(1, math.ceil(seconds))
        received = sum(int(iv.get("packets", 0)) for iv in _received(got.data.get("intervals")))
        expected = rate_mbit * 1e6 / 8 * secs / UDP_PAYLOAD
        lost = min(100.0, max(0.0, 100.0 * (1 - received / expected)))
        notes.append(f"UDP test {got.why}; the receiver got {received} of about {expected:.0f} datagrams "
                     f"sent at {rate_mbit:g} Mbit/s: loss {lost:.3g}% is estimated from that")
        return lost
    return float(got.data["end"]["sum"]["lost_percent"])


@dataclass(frozen=True)
class Timeline:
    """Mbit/s received in each second, and when (``time.monotonic()``) the first second began."""

    mbit: list[float]
    started: float


def measure_timeline_started(src_run: Runner, dst_run: Runner, dst_ip: str, rate_mbit: float,
                             seconds: float, notes: list[str] | None = None,
                             grace_s: float = GRACE_S) -> Timeline:
    """A UDP flow at ``rate_mbit`` (saturating): Mbit/s received in each second at the server.

    The start is estimated from the client's run: its set-up (connect, parameters, stream
    start: a few round trips) and its wind-down (results both ways) take about as long, so the
    flow runs in the middle of the client's lifetime.  A stalled test (``notes`` given): the
    seconds the server counted, 0 for the rest, and a note."""
    secs = max(1, math.ceil(seconds))
    got = _udp(src_run, dst_run, dst_ip, rate_mbit, seconds, notes is not None, grace_s)
    per_s = [float(iv["bits_per_second"]) / 1e6 for iv in _received(got.data.get("intervals"))]
    if got.stalled:
        assert notes is not None
        notes.append(f"UDP timeline {got.why}; {len(per_s)} of {secs} second(s) counted by the "
                     "receiver, the rest shown as 0")
        # the flow's start is not known: the client's set-up took an unknown part of the wait
        return Timeline((per_s + [0.0] * secs)[:secs], got.launched)
    overhead = max(0.0, got.finished - got.launched - secs)
    return Timeline(per_s[:secs], got.launched + overhead / 2)  # later seconds only drain the queue


def measure_timeline(src_run: Runner, dst_run: Runner, dst_ip: str, rate_mbit: float,
                     seconds: float) -> list[float]:
    """``measure_timeline_started(...).mbit``: per-second received Mbit/s of a saturating UDP flow."""
    return measure_timeline_started(src_run, dst_run, dst_ip, rate_mbit, seconds).mbit


def measure_rtt(src_run: Runner, dst_ip: str, count: int = 20, interval: float = 0.05,
                notes: list[str] | None = None) -> dict[str, Any]:
    """Ping RTT statistics in ms (avg/min/max/mdev) over ``count`` replies.

    One extra ping goes first and is not counted: it may include address resolution.  No reply
    at all: a ProbeError, or (``notes`` given, and ping ran: every request lost) figures of None,
    ``replies`` 0 and a note."""
    p = src_run(["ping", "-n", "-c", str(count + 1), "-i", str(interval), "-W", "2", dst_ip],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = _wait_out(p, (count + 1) * interval + GRACE_S)
    times = [float(m) for m in _PING_TIME.findall(out)]
    if out.count(b"icmp_seq=1 ") and times:
        times = times[1:]
    if not times:
        if notes is not None and p.returncode == 1:  # ran, nothing came back (not: no route)
            notes.append(f"ping: none of {count + 1} requests got a reply within 2 s (the path is out?)")
            return {"avg": None, "min": None, "max": None, "mdev": None, "replies": 0}
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
          down_hint_mbit: float | None = None, grace_s: float = GRACE_S) -> dict[str, Any]:
    """Throughput both ways, RTT, UDP loss both ways (and optional per-second timelines).

    Up is src -> dst, down is dst -> src; ``rtt_ms`` is the mean RTT (``rtt`` has all the
    ping figures; None without a reply).  The tests run one after another, so a timeline
    starts well after the network came up: ``up_timeline_started`` / ``down_timeline_started``
    say when (``time.monotonic()``).  ``notes``: per direction, what did not go as planned (a
    test stopped at its deadline over an outage, a ping without reply); empty lists when all
    went well.  ``machine_load``: how busy this machine's CPUs were over all the tests (busy and
    stolen per cent) and how late its 1 ms timers ran just before them (median microseconds):
    rates read low on a machine whose hypervisor takes its CPUs or wakes them late."""
    notes: dict[str, list[str]] = {"up": [], "down": []}
    res: dict[str, Any] = {}
    late_us = timer_late_us()
    before = cpu_times()
    res["up_mbit"] = measure_throughput(src_run, dst_run, dst_ip, seconds, notes["up"], grace_s)
    res["down_mbit"] = measure_throughput(dst_run, src_run, src_ip, seconds, notes["down"], grace_s)
    res["rtt"] = measure_rtt(src_run, dst_ip, notes=notes["up"])
    res["rtt_ms"] = res["rtt"]["avg"]
    up_rate = _loss_rate(res["up_mbit"], up_hint_mbit)
    down_rate = _loss_rate(res["down_mbit"], down_hint_mbit)
    res["loss_up_pct"] = measure_loss(src_run, dst_run, dst_ip, up_rate, seconds, notes["up"], grace_s)
    res["loss_down_pct"] = measure_loss(dst_run, src_run, src_ip, down_rate, seconds, notes["down"], grace_s)
    if timeline:
        ways = (("up", src_run, dst_run, dst_ip, up_hint_mbit or res["up_mbit"]),
                ("down", dst_run, src_run, src_ip, down_hint_mbit or res["down_mbit"]))
        for name, sender, receiver, ip, rate in ways:
            tl = measure_timeline_started(sender, receiver, ip, max(1.5 * rate, 0.1), seconds,  # saturating
                                          notes[name], grace_s)
            res[f"{name}_timeline"] = tl.mbit
            res[f"{name}_timeline_started"] = tl.started
    load = load_between(before, cpu_times())
    res["machine_load"] = {"busy_pct": round(load.busy_pct, 1), "steal_pct": round(load.steal_pct, 1),
                           "timer_late_us": round(late_us)}
    res["notes"] = notes
    return res
