"""Starting and stopping the userspace link process (``testbed.net.shaping.linkproc``) of one link."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.net.offload import disable_offloads
from testbed.spec.topology import Shaping

READY_TIMEOUT_S = 10.0


def link_process_argv(iface_a: str, iface_b: str, up: Shaping, down: Shaping,
                      stats_path: Path | None = None) -> list[str]:
    """The command line of a link process joining ``iface_a`` (up: a -> b) and ``iface_b``."""
    argv = [sys.executable, "-m", "testbed.net.shaping.linkproc", "--iface-a", iface_a, "--iface-b", iface_b,
            "--up", json.dumps(up.to_dict()), "--down", json.dumps(down.to_dict())]
    if stats_path is not None:
        argv += ["--stats", str(stats_path)]
    return argv


def start_link_process(iface_a: str, iface_b: str, up: Shaping, down: Shaping, *,
                       stats_path: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start the link process and wait until both of its sockets are bound.

    The child inherits the caller's environment (plus ``env``).  Raises RuntimeError (after
    reaping the child) when it dies or is not ready within ``READY_TIMEOUT_S``."""
    child_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(link_process_argv(iface_a, iface_b, up, down, stats_path),
                            stdout=subprocess.PIPE, env=child_env)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        code = stop_link_process(proc)
        proc.stdout.close()
        raise RuntimeError(f"link process {iface_a}<->{iface_b} did not start (exit code {code}; "
                           "its error is on stderr)")
    proc.stdout.close()
    return proc


def stop_link_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM (the child writes its stats), wait, SIGKILL if it does not exit; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


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
