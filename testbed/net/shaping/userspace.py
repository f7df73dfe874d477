"""The userspace shaping backend: one link process (``testbed.net.shaping.linkproc``) per link.

Also the start/stop of one link process, and ``netns_link``: two namespaces joined by a link
process, without Mininet (tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from testbed.net.errors import NetworkError
from testbed.net.offload import disable_offloads
from testbed.net.shaping.link import Link
from testbed.spec.topology import Shaping

READY_TIMEOUT_S = 10.0
PARALLEL = 8  # link processes started / stopped at once


def link_process_argv(iface_a: str, iface_b: str, up: Shaping, down: Shaping,
                      stats_path: Path | None = None) -> list[str]:
    """The command line of a link process joining ``iface_a`` (up: a -> b) and ``iface_b``."""
    argv = [sys.executable, "-m", "testbed.net.shaping.linkproc", "--iface-a", iface_a, "--iface-b", iface_b,
            "--up", json.dumps(up.to_dict()), "--down", json.dumps(down.to_dict()), "--control"]
    if stats_path is not None:
        argv += ["--stats", str(stats_path)]
    return argv


def start_link_process(iface_a: str, iface_b: str, up: Shaping, down: Shaping, *,
                       stats_path: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start the link process and wait until both of its sockets are bound.

    The child inherits the caller's environment (plus ``env``); its stdin is the control channel
    (``update_link_process``; closing it stops the child, so it never outlives its owner), its
    stderr goes to a file read by ``last_error``.  Raises RuntimeError (after reaping the child)
    when it dies or is not ready within ``READY_TIMEOUT_S``."""
    child_env = {**os.environ, **(env or {})}
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(link_process_argv(iface_a, iface_b, up, down, stats_path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog, env=child_env)
    proc.errlog = errlog  # type: ignore[attr-defined]
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        code = stop_link_process(proc)
        proc.stdout.close()
        why = last_error(proc)
        raise RuntimeError(f"link process {iface_a}<->{iface_b} did not start (exit code {code}"
                           + (f": {why})" if why else ")"))
    proc.stdout.close()
    return proc


def last_error(proc: subprocess.Popen) -> str:
    """The last line the link process wrote to stderr ('' if none)."""
    errlog = getattr(proc, "errlog", None)
    if errlog is None:
        return ""
    try:
        errlog.seek(0)
        lines = errlog.read().decode(errors="replace").strip().splitlines()
    except (OSError, ValueError):
        return ""
    return lines[-1] if lines else ""


def update_link_process(proc: subprocess.Popen, up: Shaping | None, down: Shaping | None) -> None:
    """Send new settings for one or both directions over the control channel."""
    msg = {name: s.to_dict() for name, s in (("up", up), ("down", down)) if s is not None}
    if proc.stdin is None or proc.poll() is not None:
        raise NetworkError("link process is not running")
    try:
        proc.stdin.write((json.dumps(msg) + "\n").encode())
        proc.stdin.flush()
    except (BrokenPipeError, ValueError) as e:
        raise NetworkError(f"link process control channel closed ({e})") from None


def stop_link_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM (the child writes its stats), wait, SIGKILL if it does not exit; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return _reaped(proc, proc.wait(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
    return _reaped(proc, proc.wait())


def _reaped(proc: subprocess.Popen, code: int) -> int:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    return code


class UserspaceShaper:
    """Shapes each link with its own link process joining the link's two root-namespace ports."""

    name = "userspace"
    joins_in_root = True  # each end has a root-namespace port; the link process joins the two
    trace_t0 = None  # each link process replays its traces from its own start

    def __init__(self, on_started: Callable[[int], None] | None = None) -> None:
        self.on_started = on_started  # told each link process's pid (the run's state record)
        self.procs: dict[int, tuple[Link, subprocess.Popen]] = {}
        self._lock = threading.Lock()

    def apply_all(self, links: list[Link]) -> None:
        """Offloads off on the host-side ends, then one link process per link, in parallel (each
        one is a Python start-up that waits until its sockets are bound).  When one fails, every
        one that did start is kept for ``close``, and the first error is raised."""
        host_ends = [e for link in links for e in (link.a, link.b) if e.host_if is not None]
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda e: disable_offloads(e.host_if, pid=e.pid), host_ends))
            futures = [pool.submit(self.apply, link, link.spec.up, link.spec.down) for link in links]
            wait(futures)
        for f in futures:
            if f.exception() is not None:
                raise f.exception()

    def apply(self, link: Link, up: Shaping, down: Shaping) -> None:
        self.remove(link)
        try:
            proc = start_link_process(link.a.ifname, link.b.ifname, up, down)
        except RuntimeError as e:
            raise NetworkError(f"link {link.name}: {e}") from None
        with self._lock:
            self.procs[link.index] = (link, proc)
        if self.on_started is not None:
            self.on_started(proc.pid)

    def update(self, link: Link, up: Shaping | None = None, down: Shaping | None = None) -> None:
        entry = self.procs.get(link.index)
        if entry is None:
            raise NetworkError(f"link {link.name}: no link process")
        try:
            update_link_process(entry[1], up, down)
        except NetworkError as e:
            raise NetworkError(f"link {link.name}: {e}") from None

    def remove(self, link: Link) -> None:
        with self._lock:
            entry = self.procs.pop(link.index, None)
        if entry is not None:
            stop_link_process(entry[1])

    def check(self) -> None:
        """Raise ``NetworkError`` naming the first link whose process has exited."""
        with self._lock:
            entries = list(self.procs.values())
        for link, proc in entries:
            code = proc.poll()
            if code is not None:
                why = last_error(proc)
                raise NetworkError(f"link {link.name}: link process exited with {code}"
                                   + (f" ({why})" if why else ""))

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for _, p in self.procs.values()]

    def close(self) -> None:
        """Stop every link process (8 at a time)."""
        with self._lock:
            procs = [p for _, p in self.procs.values()]
            self.procs.clear()

        def stop(p: subprocess.Popen) -> None:
            with contextlib.suppress(Exception):
                stop_link_process(p)

        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(stop, procs))


@dataclass
class NetnsLink:
    """Two namespaces joined by a link process: ``ns1`` is end a (up = ns1 -> ns2)."""

    ns1: str
    ns2: str
    ip1: str
    ip2: str
    proc: subprocess.Popen
    stats_path: Path | None

    def runner(self, ns: str) -> Callable[..., subprocess.Popen]:
        """argv -> Popen inside namespace ``ns`` (a runner for ``testbed.net.probe``)."""
        return lambda argv, **kw: subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)

    @property
    def run1(self) -> Callable[..., subprocess.Popen]:
        return self.runner(self.ns1)

    @property
    def run2(self) -> Callable[..., subprocess.Popen]:
        return self.runner(self.ns2)


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def _sysctl(ns: str | None, key: str, value: str) -> None:
    argv = ["sysctl", "-qw", f"{key}={value}"]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    subprocess.run(argv, capture_output=True)


def _kill_netns_pids(ns: str) -> None:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in res.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def netns_link(up: Shaping, down: Shaping, *, stats_path: Path | None = None,
               tag: str | None = None) -> Iterator[NetnsLink]:
    """A test/bench harness without Mininet: ``tbt-<tag>-1`` <-> link process <-> ``tbt-<tag>-2``.

    veth pairs: eth0 in ns1 <-> ``tbt<tag>a`` (root) and ``tbt<tag>b`` (root) <-> eth0 in ns2;
    the link process joins the two root ends.  Cubic is the congestion control in both
    namespaces.  Everything (processes in the namespaces too) is removed on exit."""
    tag = tag or secrets.token_hex(3)
    ns1, ns2 = f"tbt-{tag}-1", f"tbt-{tag}-2"
    ra, rb = f"tbt{tag}a", f"tbt{tag}b"
    net = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(256)}"
    ip1, ip2 = f"{net}.1", f"{net}.2"
    made_ns: list[str] = []
    made_if: list[str] = []
    proc = None
    try:
        for ns, root_if, addr in ((ns1, ra, ip1), (ns2, rb, ip2)):
            _ip("netns", "add", ns)
            made_ns.append(ns)
            _ip("link", "add", root_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            made_if.append(root_if)
            _sysctl(None, f"net.ipv6.conf.{root_if}.disable_ipv6", "1")
            _sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
            _sysctl(ns, "net.ipv4.tcp_congestion_control", "cubic")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("link", "set", root_if, "up")
            disable_offloads("eth0", netns=ns)
        proc = start_link_process(ra, rb, up, down, stats_path=stats_path)
        yield NetnsLink(ns1, ns2, ip1, ip2, proc, stats_path)
    finally:
        if proc is not None:
            stop_link_process(proc)
        for ns in made_ns:
            _kill_netns_pids(ns)
        for root_if in made_if:
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", root_if)
        for ns in made_ns:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)
