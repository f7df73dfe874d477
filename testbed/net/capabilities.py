"""What the kernel offers for shaping, probed in a scratch namespace, and the choice of backend.

Backend choice (``choose_shaper``):

* ``auto``: ``kernel`` when netem exists, else ``userspace``.
* ``kernel``: HTB + netem.  Without netem it is still accepted when the topology configures
  only rates and queue limits (no delay, jitter, loss or CSV trace): HTB alone shapes those.
  Otherwise it is a ``SpecError`` naming the first field that needs netem.
* ``userspace``: the link process (works everywhere).

Ceiling (``ceiling``): the highest rate the chosen backend shapes faithfully on this machine,
measured once with real traffic between two scratch namespaces (the link process for
``userspace``, HTB on a veth pair for ``kernel``) and cached per backend, kernel release and core
count under ``/var/cache/testbed`` (``TESTBED_CACHE_DIR``).  First the TCP goodput of an unlimited
link, then links shaped at falling shares of that rate until one carries ``FAITHFUL`` of its rate
(``measure``).  On a loaded 2-core machine the link process forwards 1-2 Gbit/s unlimited but
shapes a 25 ms link with the default queue faithfully only up to about 0.3 Gbit/s: its releases
come in bursts once a window of delayed frames is in flight, and the queue overflows.
``warn_over_ceiling`` names every link direction whose configured rate (a trace: its peak
100 ms rate) is above it; every command that builds a network calls it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pyroute2.netlink.exceptions import NetlinkError

from testbed.net.shaping import kernel as kernel_shaping
from testbed.spec.errors import SpecError
from testbed.spec.options import SHAPERS
from testbed.spec.topology import Shaping, Topology


@dataclass(frozen=True)
class Capabilities:
    netem: bool
    htb: bool
    tcp_cc_allowed: tuple[str, ...]
    tcp_cc_available: tuple[str, ...]


def _try_qdiscs() -> tuple[bool, bool]:
    """In a fresh namespace (a ``sleep`` held by ``unshare -n``), add a veth and try HTB, netem."""
    holder = subprocess.Popen(["unshare", "-n", "sleep", "30"])
    try:
        ns = f"/proc/{holder.pid}/ns/net"
        # unshare execs sleep once the namespace exists: wait until it differs from ours
        deadline = time.monotonic() + 5
        while os.readlink(ns) == os.readlink("/proc/self/ns/net"):
            if time.monotonic() > deadline or holder.poll() is not None:
                raise RuntimeError("capability probe: could not create a scratch network namespace")
            time.sleep(0.002)
        with kernel_shaping.open_ns(holder.pid) as ipr:
            ipr.link("add", ifname="cap0", kind="veth", peer="cap1")
            idx = ipr.link_lookup(ifname="cap0")[0]
            try:
                ipr.tc("add", "htb", index=idx, handle="1:", default=1)
                ipr.tc("add-class", "htb", index=idx, handle="1:1", parent="1:0",
                       rate="10mbit", ceil="10mbit", quantum=1514)
                htb = True
            except NetlinkError:
                htb = False
            try:
                ipr.tc("add", "netem", index=idx, parent="1:1" if htb else "root", handle="10:",
                       delay=1000)
                netem = True
            except NetlinkError:
                netem = False
        return htb, netem
    finally:
        holder.kill()
        holder.wait()


def _sysctl_list(name: str) -> tuple[str, ...]:
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path) as f:
            return tuple(f.read().split())
    except OSError:
        return ()


@functools.cache
def probe() -> Capabilities:
    """Probe once per process (the answer does not change while we run)."""
    htb, netem = _try_qdiscs()
    return Capabilities(
        netem=netem,
        htb=htb,
        tcp_cc_allowed=_sysctl_list("net.ipv4.tcp_allowed_congestion_control"),
        tcp_cc_available=_sysctl_list("net.ipv4.tcp_available_congestion_control"),
    )


def netem_fields(topo: Topology) -> list[str]:
    """Fields of the topology that need netem (delay, jitter, loss, CSV trace)."""
    out = []
    for i, link in enumerate(topo.links):
        for direction in ("up", "down"):
            s = getattr(link, direction)
            field = f"links[{i}].{direction}"
            if s.delay_ms:
                out.append(f"{field}.delay_ms")
            if s.jitter_ms:
                out.append(f"{field}.jitter_ms")
            if s.loss_pct:
                out.append(f"{field}.loss_pct")
            if s.trace is not None and (s.format or "mahimahi") == "csv":
                out.append(f"{field}.trace")
    return out


def choose_shaper(requested: str, topo: Topology, caps: Capabilities | None = None) -> str:
    """The backend to use for ``topo``; see the module docstring for the rules."""
    if requested not in SHAPERS:
        raise SpecError(topo.source, "shaper", f"unknown shaper {requested!r} (one of {', '.join(SHAPERS)})")
    if requested == "userspace":
        return "userspace"
    caps = caps or probe()
    if requested == "auto":
        return "kernel" if caps.netem else "userspace"
    if not caps.htb:
        raise SpecError(topo.source, "shaper", "kernel backend needs the HTB qdisc, absent on this kernel")
    if not caps.netem:
        need = netem_fields(topo)
        if need:
            raise SpecError(topo.source, need[0],
                            "needs netem, absent on this kernel: use --shaper userspace (or auto)")
    return "kernel"


def check_tcp_cc(topo: Topology, caps: Capabilities | None = None) -> None:
    """Make sure namespaces may use ``topo.tcp_cc`` (allow it in the root namespace if needed)."""
    caps = caps or probe()
    if topo.tcp_cc in caps.tcp_cc_allowed:
        return
    if topo.tcp_cc not in caps.tcp_cc_available:
        subprocess.run(["modprobe", f"tcp_{topo.tcp_cc}"], capture_output=True)
        if topo.tcp_cc not in _sysctl_list("net.ipv4.tcp_available_congestion_control"):
            raise SpecError(topo.source, "tcp_cc", f"congestion control {topo.tcp_cc!r} not available")
    allowed = " ".join((*_sysctl_list("net.ipv4.tcp_allowed_congestion_control"), topo.tcp_cc))
    with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control", "w") as f:
        f.write(allowed)
    probe.cache_clear()


# --- the backend's ceiling ------------------------------------------------------------------

CEILING_VERSION = 3  # bump when the measurement changes: older cache entries are measured again
CEILING_SECONDS = 2  # per measurement (after iperf3's 1 s omitted warm-up)
# userspace rungs: a link as the shipped topologies set one up: a WAN-like one-way delay (the link
# process then holds a whole window of frames) and the default queue
CEILING_DELAY_MS = 25.0
FAITHFUL = 0.95  # a rate is carried when TCP goodput reaches this share of what the rate allows
# rungs tried, as shares of the unlimited link's rate, until one is carried faithfully
LADDER = (1.0, 0.75, 0.55, 0.4, 0.3, 0.2, 0.12)
CACHE_DIR_ENV = "TESTBED_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("/var/cache/testbed")
# TCP payload (1448 bytes with timestamps) per packet as a rate counts it: both backends count IP
# bytes, a full packet is 1500 of them
RATE_BYTES = 1500
TCP_PAYLOAD = 1448
UNLIMITED_HTB_MBIT = 30_000  # the kernel backend's unlimited rung: above what a veth carries here
_warned: set[str] = set()


@dataclass(frozen=True)
class Ceiling:
    """The highest rate ``backend`` shapes faithfully here, in its own rate units (as ``bw_mbit``)."""

    backend: str
    mbit: float
    raw_goodput_mbit: float  # TCP goodput of an unlimited link: what it forwards at most
    ladder: tuple[tuple[float, float], ...]  # (rate tried, TCP goodput measured) per rung
    from_cache: bool
    path: Path


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def _cache_key(backend: str) -> dict:
    return {"backend": backend, "kernel": os.uname().release, "cores": os.cpu_count(),
            "version": CEILING_VERSION}


def _cache_path(directory: Path, key: dict) -> Path:
    return directory / f"ceiling-{key['backend']}-{key['kernel']}-{key['cores']}c-v{key['version']}.json"


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _read_cache(path: Path, key: dict) -> dict | None:
    """The cached measurement, or None when the file is absent, corrupt or for another key."""
    try:
        data = json.loads(path.read_text())
        ladder = [(float(r), float(g)) for r, g in data["ladder"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(data.get(k) != v for k, v in key.items()) or not (
            _finite(data.get("ceiling_mbit")) and _finite(data.get("raw_goodput_mbit"))):
        return None
    return {**data, "ladder": ladder}


def _write_cache(path: Path, key: dict, measured: dict) -> None:
    """Write the entry atomically (a reader sees the old file or the whole new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**key, **measured, "measured_unix": time.time()}) + "\n")
    os.replace(tmp, path)


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def _shape_htb(ns: str, mbit: float) -> None:
    """HTB at ``mbit`` (as the kernel backend sets it up) on ``eth0`` of the named namespace."""
    from pyroute2 import IPRoute, netns

    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        netns.pushns(fd)
        try:
            ipr = IPRoute()
        finally:
            netns.popns()
    finally:
        os.close(fd)
    with ipr:
        kernel_shaping.apply(ipr, "eth0", Shaping(bw_mbit=mbit), netem=False)


@contextlib.contextmanager
def _kernel_pair(mbit: float) -> Iterator[tuple]:
    """Two scratch namespaces joined by a veth pair shaped by HTB at ``mbit`` both ways; yields
    (runner in 1, runner in 2, address in 2).  ``testbed clean`` leaves ``tbt-`` namespaces alone."""
    tag = secrets.token_hex(3)
    names = [f"tbt-{tag}-1", f"tbt-{tag}-2"]
    net = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(256)}"
    made: list[str] = []
    try:
        for ns in names:
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", names[0], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", names[1])
        for k, ns in enumerate(names):
            _ip("-n", ns, "addr", "add", f"{net}.{k + 1}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _shape_htb(ns, mbit)

        def runner(ns: str):
            return lambda argv, **kw: subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)

        yield runner(names[0]), runner(names[1]), f"{net}.2"
    finally:
        for ns in made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _goodput(backend: str, mbit: float | None) -> list[float]:
    """Per-second TCP goodput through one link of ``backend`` at ``mbit`` (None: unlimited)."""
    from testbed.net.probe import throughput_intervals

    if backend == "userspace":
        from testbed.net.shaping.userspace import netns_link

        s = Shaping() if mbit is None else Shaping(bw_mbit=mbit, delay_ms=CEILING_DELAY_MS)
        with netns_link(s, s) as link:
            return throughput_intervals(link.run1, link.run2, link.ip2, CEILING_SECONDS)
    if backend == "kernel":
        with _kernel_pair(UNLIMITED_HTB_MBIT if mbit is None else mbit) as (run1, run2, ip2):
            return throughput_intervals(run1, run2, ip2, CEILING_SECONDS)
    raise ValueError(f"no ceiling for backend {backend!r}")


def measure(backend: str) -> dict:
    """Measure ``backend`` here: the TCP goodput of an unlimited link (its best second: what it
    forwards at most), then links shaped at falling shares of that rate until one carries
    ``FAITHFUL`` of its rate as TCP goodput.  That rate is the ceiling."""
    share = TCP_PAYLOAD / RATE_BYTES
    raw = max(_goodput(backend, None))
    ladder: list[tuple[float, float]] = []
    for f in LADDER:
        rate = float(f"{raw / share * f:.3g}")
        per_s = _goodput(backend, rate)
        got = sum(per_s) / len(per_s)
        ladder.append((rate, got))
        if got >= FAITHFUL * rate * share:
            break
    return {"ceiling_mbit": ladder[-1][0], "raw_goodput_mbit": raw, "ladder": ladder,
            "faithful": FAITHFUL, "delay_ms": CEILING_DELAY_MS if backend == "userspace" else 0.0}


def ceiling(backend: str, directory: Path | None = None, stream: TextIO | None = None) -> Ceiling:
    """``backend``'s ceiling on this machine: cached, else measured now and cached (a note on
    ``stream`` says so: it takes up to half a minute, once).

    Concurrent callers wait for one measurement (a lock file); a corrupt entry, or one for
    another kernel, core count or measurement version, is measured again."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    key = _cache_key(backend)
    path = _cache_path(directory, key)
    with open(directory / "ceiling.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read_cache(path, key)
        from_cache = data is not None
        if data is None:
            if stream is not None:
                print(f"note: measuring what the {backend} backend carries on this machine (once; "
                      f"cached in {path})", file=stream, flush=True)
            data = measure(backend)
            _write_cache(path, key, data)
    return Ceiling(backend, float(data["ceiling_mbit"]), float(data["raw_goodput_mbit"]),
                   tuple((float(r), float(g)) for r, g in data["ladder"]), from_cache, path)


def peak_rate_mbit(s: Shaping) -> float | None:
    """Configured peak rate of one direction (a trace: its highest 100 ms bin; None: unlimited)."""
    if s.trace is not None:
        from testbed.spec.traces import load_trace

        try:
            return float(load_trace(s.trace, s.format or "mahimahi").rate_bins_mbit(100).max())
        except SpecError:
            return None  # a warning does not judge the trace: shaping it reports the error, naming the link
    return s.bw_mbit


def over_ceiling(topo: Topology, ceil: Ceiling) -> list[str]:
    """One warning line per link direction whose configured rate is above ``ceil``."""
    out = []
    for i, link in enumerate(topo.links):
        for direction in ("up", "down"):
            s: Shaping = getattr(link, direction)
            rate = peak_rate_mbit(s)
            if rate is None or rate <= ceil.mbit:
                continue
            what = f"trace peak {rate:.0f}" if s.trace is not None else f"{rate:g}"
            out.append(f"warning: {topo.source}: links[{i}] {link.a}<->{link.b} {direction} {what} Mbit/s is "
                       f"above what the {ceil.backend} backend carries on this machine (~{ceil.mbit:.0f} "
                       f"Mbit/s): measurements on this link will be capped")
    return out


def warn_over_ceiling(topo: Topology, backend: str, stream: TextIO | None = None) -> list[str]:
    """Print (to stderr) each link direction configured above ``backend``'s ceiling, once per
    process; returns the lines.  Measures the ceiling first when it is not cached yet (only if
    some link has a rate at all)."""
    stream = stream or sys.stderr
    if all(peak_rate_mbit(getattr(lk, d)) is None for lk in topo.links for d in ("up", "down")):
        return []
    try:
        ceil = ceiling(backend, stream=stream)
    except (OSError, RuntimeError, ValueError) as e:  # ProbeError is a RuntimeError
        lines = [f"warning: could not measure what the {backend} backend carries on this machine "
                 f"({' '.join(str(e).split())}): link rates are not checked against it"]
    else:
        lines = over_ceiling(topo, ceil)
    for line in lines:
        if line not in _warned:
            _warned.add(line)
            print(line, file=stream, flush=True)
    return lines
