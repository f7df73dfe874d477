"""Supervision of a running network: a dead link process or a stopped trace replay ends the run
with an error naming the link, nothing is left behind, and a second Ctrl-C cannot cut a teardown
short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from testbed.net.clean import leftovers
from testbed.net.errors import NetworkError
from testbed.net.network import EmulatedNetwork
from testbed.net.teardown import signals_deferred
from testbed.spec.errors import SpecError
from testbed.spec.topology import LinkSpec, NodeSpec, Shaping, Topology

NOTHING = {"devices": [], "processes": [], "cgroups": [], "state": []}


def chain(links: list[tuple[str, str, Shaping]]) -> Topology:
    names = {n for a, b, _ in links for n in (a, b)}
    nodes = {n: NodeSpec(n, "edge" if n == "mec" else "device") for n in names}
    return Topology("wd", Path("wd.yaml"), nodes, [LinkSpec(a, b, s, Shaping()) for a, b, s in links])


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_signals_deferred_redelivers_after():
    got = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            got.append("finished")  # the block ran to its end
    assert got == ["finished"]


@pytest.mark.root
@pytest.mark.slow
def test_dead_link_process_ends_the_run():
    topo = chain([("phone", "mec", Shaping(bw_mbit=10)), ("mec", "cloud", Shaping(bw_mbit=20))])
    told: list[NetworkError] = []
    with pytest.raises(NetworkError, match=r"^link phone<->mec: link process exited with -9$"):
        with EmulatedNetwork(topo, shaper="userspace", on_failure=told.append) as net:
            run_id = net.run_id
            net.check()  # healthy
            proc = net.backend.procs[0][1]
            os.kill(proc.pid, signal.SIGKILL)
            assert wait_for(lambda: told), "the watchdog did not notice"
            with pytest.raises(NetworkError, match="phone<->mec"):
                net.check()
    assert str(told[0]) == "link phone<->mec: link process exited with -9"
    assert leftovers(run_id) == NOTHING


@pytest.mark.root
@pytest.mark.slow
def test_trace_replay_error_is_reported(tmp_path: Path):
    trace = tmp_path / "t.up"
    trace.write_text("".join(f"{i}\n" for i in range(1, 101)))  # 12 Mbit/s for 100 ms, looping
    topo = chain([("phone", "mec", Shaping(trace=trace, format="mahimahi"))])
    told: list[NetworkError] = []
    with pytest.raises(NetworkError, match=r"^link phone<->mec: trace replay stopped"):
        with EmulatedNetwork(topo, shaper="kernel", on_failure=told.append) as net:
            run_id = net.run_id
            ifname = net.links[0].a.ifname
            # take the shaped qdisc away under the replay: its next rate change is refused
            out = net.cmd("phone", ["tc", "qdisc", "del", "dev", ifname, "root"])
            assert out == "", out
            assert wait_for(lambda: told), "the replay error was not reported"
    assert leftovers(run_id) == NOTHING


@pytest.mark.root
@pytest.mark.slow
def test_failed_link_start_leaves_no_link_process(tmp_path: Path):
    """One link process cannot start (its trace is gone); the others, started alongside, are
    stopped too."""
    links = [(f"d{i}", "mec", Shaping(bw_mbit=5)) for i in range(4)]
    links.append(("d9", "mec", Shaping(trace=tmp_path / "gone.up", format="mahimahi")))
    net = EmulatedNetwork(chain(links), shaper="userspace")
    with pytest.raises(NetworkError, match=r"link d9<->mec: .*trace file not found"):
        net.start()
    assert leftovers(net.run_id) == NOTHING


DRIVER = """
import sys, time
from testbed.spec.topology import load_topology
from testbed.net.network import EmulatedNetwork
net = EmulatedNetwork(load_topology(sys.argv[1]), shaper="userspace")
net.start()
print("ready", net.run_id, flush=True)
try:
    time.sleep(600)
finally:
    print("stopping", flush=True)
    net.stop()
    print("stopped", flush=True)
"""

TOPO = """
name: wd
nodes:
  d1: {role: device}
  d2: {role: device}
  cell: {role: cell}
  mec: {role: edge}
links:
  - between: [d1, cell]
    up: {bw_mbit: 10}
  - between: [d2, cell]
    up: {bw_mbit: 10}
  - between: [cell, mec]
"""


@pytest.mark.root
@pytest.mark.slow
def test_second_ctrl_c_does_not_cut_teardown_short(tmp_path: Path):
    topo = tmp_path / "wd.yaml"
    topo.write_text(TOPO)
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(topo)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert line[0] == "ready", line
    run_id = line[1]
    p.send_signal(signal.SIGINT)
    assert p.stdout.readline().strip() == "stopping"
    time.sleep(0.1)  # into the teardown (about a second for these links)
    p.send_signal(signal.SIGINT)
    threading.Timer(0.05, lambda: p.poll() is None and p.send_signal(signal.SIGINT)).start()
    _, err = p.communicate(timeout=60)
    # the teardown ran to its end; the held Ctrl-C was delivered after it (from the deferral)
    assert leftovers(run_id) == NOTHING
    assert p.returncode != 0 and "signals_deferred" in err, err


@pytest.mark.root
@pytest.mark.slow
def test_bad_trace_in_kernel_backend_is_a_spec_error(tmp_path: Path):
    topo = chain([("phone", "mec", Shaping(trace=tmp_path / "gone.up", format="mahimahi"))])
    net = EmulatedNetwork(topo, shaper="kernel")
    with pytest.raises(SpecError, match="trace file not found"):
        net.start()
    assert leftovers(net.run_id) == NOTHING
