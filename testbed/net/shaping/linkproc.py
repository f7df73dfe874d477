"""The userspace link process: bridges L2 frames between two interfaces and shapes them.

``python -m testbed.net.shaping.linkproc --iface-a A --iface-b B --up JSON --down JSON [--stats FILE]
[--control]``

Frames read on A leave on B shaped by ``--up``; frames read on B leave on A shaped by
``--down`` (each a ``Shaping`` as JSON).  Per packet: random loss -> drop-tail rate queue ->
serialization at the rate (or at trace delivery opportunities) -> propagation delay plus
jitter (never released before the previous packet: no reordering) -> send.

Rates count IP packet bytes (the frame without its 14-byte Ethernet header), as mahimahi
does (the kernel backend counts the same bytes).  ``queue_pkts`` bounds the packets waiting for
the rate, not those waiting out their delay.  A mahimahi trace gives one 1500-byte
opportunity per line; a packet leaves when the opportunity bytes accumulated since it reached
the head of the queue cover it, unused bytes are lost.  CSV traces give the same
opportunities (derived from their rate steps) plus per-step delay/loss added to the fixed ones.
Trace time 0 is the start of the process, or ``trace_start_s`` into the trace's clock then.

The loop is single-threaded: epoll on two AF_PACKET sockets and a signal wake-up pipe; the
departure time of a packet is computed when it arrives, so each direction is a FIFO of
``(release time, frame)`` and the only timer is the head of each FIFO.  Offloads are turned
off on both interfaces (per-packet behaviour needs unsegmented, checksummed frames).  On
SIGTERM/SIGINT it writes its counters as JSON to ``--stats`` and exits 0.  It writes the
stats file (with zero counters) once at start-up too, and prints ``ready`` on stdout when
both sockets are bound.  It runs at the lowest real-time priority when allowed (else nice
-10): its wake-up latency is link delay.

With ``--control`` it reads stdin: each line a JSON object ``{"up": {...}, "down": {...}}``
(either key optional, each a ``Shaping`` without a trace) changes that direction's rate,
delay, jitter, loss and queue limit from then on; end of input (its owner has gone) stops it.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from pathlib import Path

from testbed.net.naming import PREFIX
from testbed.net.offload import disable_offloads
from testbed.spec.errors import SpecError
from testbed.spec.topology import Shaping

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
PACKET_STATISTICS = 6
ETH_HLEN = 14
OPPORTUNITY_BYTES = 1500
DEFAULT_QUEUE_PKTS = 1000
SOCK_BUF = 8 << 20
RECV_BATCH = 256
FRAME_MAX = 65536
# Frames due within this much of now leave together: fewer wake-ups (at 200 Mbit/s about 0.37
# instead of 0.57 of a core, bench/README.md) for at most 0.2 ms of earliness.
RELEASE_EARLY_S = 0.0002
LINK_RT_PRIORITY = 1  # SCHED_RR priority when allowed (root)
LINK_NICE = -10  # else this nice value


class Direction:
    """One shaped direction: its counters and the FIFO of frames waiting to be released."""

    __slots__ = ("name", "fifo", "queued", "loss", "rate_bps", "delay", "jitter", "limit",
                 "busy_until", "last_release", "opps", "n_opps", "period", "opp_k", "opp_left",
                 "step_starts", "steps", "t0", "pkts_in", "bytes_in", "pkts_out", "bytes_out",
                 "drop_loss", "drop_queue", "drop_socket")

    def __init__(self, name: str, s: Shaping, t0: float) -> None:
        self.name = name
        self.fifo: deque[tuple[float, bytes]] = deque()
        self.queued: deque[float] = deque()  # departure times of frames still in the rate queue
        self.loss = s.loss_pct / 100.0
        self.rate_bps = s.bw_mbit * 1e6 / 8.0 if s.bw_mbit is not None else None
        self.delay = s.delay_ms / 1000.0
        self.jitter = s.jitter_ms / 1000.0
        self.limit = s.queue_pkts or DEFAULT_QUEUE_PKTS
        self.busy_until = 0.0
        self.last_release = 0.0
        self.t0 = t0
        self.opps: list[float] = []
        self.n_opps = 0
        self.period = 0.0
        self.opp_k = -1  # the opportunity in use, counted from t0 across loops
        self.opp_left = 0  # its bytes not yet used
        self.step_starts: list[float] = []
        self.steps: list[tuple[float, float]] = []  # (extra delay s, extra loss prob) per step
        self.pkts_in = self.bytes_in = self.pkts_out = self.bytes_out = 0
        self.drop_loss = self.drop_queue = self.drop_socket = 0
        if s.trace is not None:
            self._load_trace(s)

    def _load_trace(self, s: Shaping) -> None:
        from testbed.spec.traces import load_trace

        # errors name the flag that carried the trace (the path is in the message once)
        trace = load_trace(s.trace, s.format, source=Path(f"--{self.name}"))
        self.opps = [float(x) / 1000.0 for x in trace.opportunities_ms]
        self.n_opps = len(self.opps)
        self.period = trace.period_ms / 1000.0
        self.rate_bps = None
        for st in trace.steps:
            self.step_starts.append(st.t_s)
            self.steps.append(((st.delay_ms or 0.0) / 1000.0, (st.loss_pct or 0.0) / 100.0))

    def reconfigure(self, s: Shaping) -> None:
        """New rate, delay, jitter, loss and queue limit from now on (frames already admitted keep
        their times).  A trace cannot be swapped in or out while running."""
        if s.trace is not None or self.n_opps:
            raise ValueError("a traced direction cannot be reconfigured")
        self.loss = s.loss_pct / 100.0
        self.rate_bps = s.bw_mbit * 1e6 / 8.0 if s.bw_mbit is not None else None
        self.delay = s.delay_ms / 1000.0
        self.jitter = s.jitter_ms / 1000.0
        self.limit = s.queue_pkts or DEFAULT_QUEUE_PKTS

    def _opp_time(self, k: int) -> float:
        loops, i = divmod(k, self.n_opps)
        return self.t0 + loops * self.period + self.opps[i]

    def _trace_departure(self, size: int, now: float) -> float:
        """Departure time of a ``size``-byte packet arriving at ``now`` (mahimahi rules)."""
        k, left = self.opp_k, self.opp_left
        if left <= 0:  # the current opportunity is used up (or there is none yet)
            k += 1
            left = OPPORTUNITY_BYTES
        if self._opp_time(k) < now:  # the link idled: opportunities in the past are lost
            el = now - self.t0
            loops = math.floor(el / self.period)
            i = bisect.bisect_left(self.opps, el - loops * self.period)
            k = loops * self.n_opps + i  # i == n_opps is the first opportunity of the next loop
            if self.n_opps and self._opp_time(k) < now:
                k += 1
            left = OPPORTUNITY_BYTES
        while size > left:
            size -= left
            k += 1
            left = OPPORTUNITY_BYTES
        self.opp_k, self.opp_left = k, left - size
        return self._opp_time(k)

    def admit(self, frame: bytes, now: float) -> None:
        """Loss, queue limit, serialization and delay for one frame read at ``now``."""
        size = len(frame)
        self.pkts_in += 1
        self.bytes_in += size
        delay, loss = self.delay, self.loss
        if self.steps:
            j = bisect.bisect_right(self.step_starts, (now - self.t0) % self.period) - 1
            extra_delay, extra_loss = self.steps[j if j >= 0 else 0]
            delay += extra_delay
            loss += extra_loss
        if loss and random.random() < loss:
            self.drop_loss += 1
            return
        if self.rate_bps is not None or self.n_opps:
            queued = self.queued
            while queued and queued[0] <= now:
                queued.popleft()
            if len(queued) >= self.limit:
                self.drop_queue += 1
                return
            if self.n_opps:
                depart = self._trace_departure(size - ETH_HLEN, now)
            else:
                start = self.busy_until if self.busy_until > now else now
                depart = self.busy_until = start + (size - ETH_HLEN) / self.rate_bps
            queued.append(depart)
        else:
            depart = now
        release = depart + delay
        if self.jitter:
            release += random.uniform(-self.jitter, self.jitter)
            if release < depart:
                release = depart
        if release < self.last_release:
            release = self.last_release
        self.last_release = release
        self.fifo.append((release, frame))

    def stats(self) -> dict[str, int]:
        return {"pkts_in": self.pkts_in, "bytes_in": self.bytes_in, "pkts_out": self.pkts_out,
                "bytes_out": self.bytes_out, "dropped_loss": self.drop_loss,
                "dropped_queue": self.drop_queue, "dropped_socket": self.drop_socket,
                "queued": len(self.fifo)}


def socket_drops(s: socket.socket) -> int:
    """Frames the kernel dropped because our receive buffer was full (since the last call)."""
    _packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return drops


def open_socket(ifname: str) -> socket.socket:
    """A raw packet socket on ``ifname`` that sees only frames arriving there."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    for opt in (33, 32):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE (root); fall back to the capped ones
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF if opt == 33 else socket.SO_SNDBUF, SOCK_BUF)
    s.bind((ifname, ETH_P_ALL))
    return s


def raise_priority() -> str:
    """The emulated wire should not wait behind the experiment's processes for a CPU.

    Real-time round-robin at the lowest RT priority when allowed (the loop sleeps whenever
    no frame is due, and the kernel's RT throttling caps it anyway), else nice -10, else
    nothing.  Returns which one it got."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(LINK_RT_PRIORITY))
        return "rr"
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, LINK_NICE)
        return "nice"
    return "default"


def write_stats(path: Path | None, up: Direction, down: Direction, started: float) -> None:
    if path is None:
        return
    data = {"started_unix": started, "pid": os.getpid(), "up": up.stats(), "down": down.stats()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def run(iface_a: str, iface_b: str, up_s: Shaping, down_s: Shaping, stats: Path | None,
        control: bool = False) -> int:
    up, down = Direction("up", up_s, 0.0), Direction("down", down_s, 0.0)  # traces load first
    for ifname in (iface_a, iface_b):
        disable_offloads(ifname)
    raise_priority()
    sock_a, sock_b = open_socket(iface_a), open_socket(iface_b)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    started = time.time()
    now = time.monotonic()
    up.t0, down.t0 = now - up_s.trace_start_s, now - down_s.trace_start_s  # trace clock's 0
    socket_drops(sock_a)  # reset: frames before start-up are not ours to count
    socket_drops(sock_b)
    write_stats(stats, up, down, started)
    # fd -> (socket to read, its direction)
    route = {sock_a.fileno(): (sock_a, up), sock_b.fileno(): (sock_b, down)}
    fds = [sock_a.fileno(), sock_b.fileno(), rfd]
    if control:
        ctl = Control(sys.stdin.fileno(), {"up": up, "down": down}, stop)
        route[ctl.fd] = (None, ctl)
        fds.append(ctl.fd)
    print("ready", flush=True)
    _serve(fds, route, (up, sock_b), (down, sock_a), stop)
    up.drop_socket += socket_drops(sock_a)
    down.drop_socket += socket_drops(sock_b)
    write_stats(stats, up, down, started)
    return 0


def _serve(fds: list[int], route: dict, up_out: tuple, down_out: tuple, stop: list) -> None:
    """The event loop: read arriving frames, release due ones, sleep until the next is due.

    ``select`` rather than epoll: its timeout has microsecond resolution (epoll's is 1 ms).
    """
    clock = time.monotonic
    wait_for = select.select
    dontwait = socket.MSG_DONTWAIT
    outs = (up_out, down_out)
    timeout: float | None = None
    while not stop:
        ready = wait_for(fds, (), (), timeout)[0]
        now = clock()
        for fd in ready:
            entry = route.get(fd)
            if entry is None:
                os.read(fd, 512)  # the signal wake-up pipe: ``stop`` is set by then
                continue
            sock, d = entry
            if sock is None:  # the control channel
                d.read()
                continue
            recv, admit = sock.recv, d.admit
            for _ in range(RECV_BATCH):
                try:
                    frame = recv(FRAME_MAX, dontwait)
                except BlockingIOError:
                    break
                except OSError:  # e.g. ENETDOWN while an interface is down: reported once
                    break
                admit(frame, now)
        now = clock()
        timeout = None
        for d, out in outs:
            fifo = d.fifo
            if not fifo:
                continue
            send = out.send
            due = now + RELEASE_EARLY_S
            while fifo and fifo[0][0] <= due:
                frame = fifo.popleft()[1]
                try:
                    send(frame)
                except OSError:  # ENOBUFS and the like: the frame is lost, as on a real link
                    continue
                d.pkts_out += 1
                d.bytes_out += len(frame)
            if fifo:
                wait = fifo[0][0] - now
                if timeout is None or wait < timeout:
                    timeout = wait


class Control:
    """The ``--control`` channel: JSON lines on stdin reconfigure directions; EOF stops the loop."""

    def __init__(self, fd: int, directions: dict[str, Direction], stop: list) -> None:
        self.fd = fd
        self.directions = directions
        self.stop = stop
        self.buf = b""
        os.set_blocking(fd, False)

    def read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.stop.append(1)
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                self._apply(line)

    def _apply(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            changes = {name: Shaping.from_dict(msg[name]) for name in ("up", "down") if name in msg}
            for name, s in changes.items():
                self.directions[name].reconfigure(s)
        except (ValueError, TypeError, KeyError) as e:  # a bad line is reported, the link goes on
            print(f"linkproc: --control: bad line ({e})", file=sys.stderr, flush=True)


def _shaping(text: str, flag: str) -> Shaping:
    try:
        return Shaping.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"linkproc: {flag}: bad shaping JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="linkproc", description=__doc__.splitlines()[0])
    ap.add_argument("--iface-a", required=True)
    ap.add_argument("--iface-b", required=True)
    ap.add_argument("--up", default="{}", help="Shaping JSON for a -> b")
    ap.add_argument("--down", default="{}", help="Shaping JSON for b -> a")
    ap.add_argument("--stats", type=Path, default=None)
    ap.add_argument("--control", action="store_true", help="read shaping changes from stdin; stop at EOF")
    args = ap.parse_args(argv)
    for flag, name in (("--iface-a", args.iface_a), ("--iface-b", args.iface_b)):
        if not name.startswith(PREFIX):  # never touch (offloads!) an interface we did not create
            raise SystemExit(f"linkproc: {flag}: {name!r} is not a testbed interface ({PREFIX}...)")
    try:
        return run(args.iface_a, args.iface_b, _shaping(args.up, "--up"), _shaping(args.down, "--down"),
                   args.stats, args.control)
    except (SpecError, RuntimeError, OSError) as e:  # bad trace, missing interface: one line
        print(f"linkproc: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
