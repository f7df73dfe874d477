"""EmulatedNetwork on real namespaces: every shipped topology builds and all pairs reach each
other, routes follow the chain, HTB-only kernel shaping holds its rate, teardown leaves nothing."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from testbed.net import capabilities
from testbed.net.network import EmulatedNetwork
from testbed.spec.errors import SpecError
from testbed.spec.topology import LinkSpec, NodeSpec, Shaping, Topology, load_topology

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "topologies").glob("*.yaml"))

pytestmark = [pytest.mark.root, pytest.mark.slow]


def rates_only(topo: Topology) -> Topology:
    """The topology with only its rates: the kernel backend shapes that without netem."""
    def strip(s: Shaping) -> Shaping:
        return Shaping(bw_mbit=s.bw_mbit, queue_pkts=s.queue_pkts,
                       trace=s.trace if (s.format or "mahimahi") == "mahimahi" else None, format=s.format)
    links = [dataclasses.replace(link, up=strip(link.up), down=strip(link.down)) for link in topo.links]
    return dataclasses.replace(topo, links=links)


def root_devices(run_id: str) -> list[str]:
    with IPRoute() as ipr:
        return [x.get("ifname") for x in ipr.get_links() if x.get("ifname", "").startswith("tb" + run_id)]


def assert_gone(net: EmulatedNetwork, shells: list[int]) -> None:
    assert root_devices(net.run_id) == []
    assert not net.state.path.exists()
    for pid in shells:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_topology_all_pairs_reach(path: Path):
    topo = rates_only(load_topology(path))
    hosts = [h.name for h in topo.hosts()]
    with EmulatedNetwork(topo, shaper="kernel") as net:
        shells = [net.pid(h) for h in hosts]
        cells = [n for n in topo.nodes.values() if n.role == "cell"]
        assert len([d for d in root_devices(net.run_id) if re.fullmatch(r"tb\w{5}c\d+", d)]) == len(cells)
        procs = {(a, b): net.popen(a, ["ping", "-c", "2", "-i", "0.2", "-W", "2", net.ip(b, a)])
                 for a in hosts for b in hosts if a != b}
        failed = [pair for pair, p in procs.items() if p.wait(timeout=20) != 0]
        assert failed == []
        cc = net.cmd(hosts[0], ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).strip()
        assert cc == topo.tcp_cc == net.tcp_cc
    assert_gone(net, shells)


def test_chain_routes_hop_by_hop():
    topo = rates_only(load_topology(REPO / "topologies/chain-4hop.yaml"))
    with EmulatedNetwork(topo, shaper="kernel") as net:
        out = net.cmd("phone", ["ping", "-c", "1", "-W", "2", net.ip("cloud")])
        # four links: three forwarding hosts each decrement the TTL (64 -> 61)
        assert re.search(r"ttl=61\b", out), out
        route = net.cmd("phone", ["ip", "route", "get", net.ip("cloud")])
        assert f"via {net.ip('edge1', 'phone')}" in route
        route = net.cmd("edge2", ["ip", "route", "get", net.ip("phone")])
        assert f"via {net.ip('edge1', 'edge2')}" in route


def iperf_mbit(net: EmulatedNetwork, src: str, dst: str, seconds: int = 4) -> float:
    server = net.popen(dst, ["iperf3", "-s", "-1", "-p", "5201"])
    try:
        time.sleep(0.3)
        argv = ["iperf3", "-c", net.ip(dst, src), "-p", "5201", "-t", str(seconds), "-J", "-O", "1"]
        out = net.cmd(src, argv)
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.kill()
        server.wait()


def test_kernel_backend_htb_rates():
    nodes = {"a": NodeSpec("a", "device"), "b": NodeSpec("b", "edge")}
    topo = Topology("rates", Path("rates.yaml"), nodes,
                    [LinkSpec("a", "b", Shaping(bw_mbit=10), Shaping(bw_mbit=30))])
    with EmulatedNetwork(topo, shaper="kernel") as net:
        assert net.shaper == "kernel"
        up, down = iperf_mbit(net, "a", "b"), iperf_mbit(net, "b", "a")
    # goodput over HTB: TCP/IP headers take ~4% of the configured rate
    assert 0.90 * 10 <= up <= 1.02 * 10, up
    assert 0.90 * 30 <= down <= 1.02 * 30, down


def test_capability_probe_and_kernel_errors_without_netem():
    caps = capabilities.probe()
    assert caps.htb
    # asked of the kernel in a namespace of our own (never on the host's interfaces): its lo
    # goes with it
    have_netem = subprocess.run(["unshare", "-n", "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                 "delay", "0ms"], capture_output=True).returncode == 0
    assert caps.netem == have_netem
    topo = load_topology(REPO / "topologies/device-edge-cloud.yaml")
    assert capabilities.choose_shaper("auto", topo) == ("kernel" if have_netem else "userspace")
    if not have_netem:
        with pytest.raises(SpecError, match=r"links\[0\]\.up\.delay_ms: needs netem"):
            EmulatedNetwork(topo, shaper="kernel")
        assert capabilities.choose_shaper("kernel", rates_only(topo)) == "kernel"


def test_failed_bring_up_leaves_nothing(tmp_path: Path):
    nodes = {"a": NodeSpec("a", "device"), "b": NodeSpec("b", "edge")}
    missing = tmp_path / "missing.trace"
    topo = Topology("bad", tmp_path / "bad.yaml", nodes,
                    [LinkSpec("a", "b", Shaping(trace=missing, format="mahimahi"))])
    net = EmulatedNetwork(topo, shaper="kernel")
    with pytest.raises(SpecError, match="trace file not found"):
        net.start()
    assert root_devices(net.run_id) == [] and not net.state.path.exists()


def test_cli_kernel_with_delay_is_a_one_line_error():
    have_netem = capabilities.probe().netem
    if have_netem:
        pytest.skip("netem present: the kernel backend can shape delays here")
    topo = REPO / "topologies/device-edge-cloud.yaml"
    argv = [sys.executable, "-m", "testbed", "probe", str(topo), "--src", "phone", "--dst", "mec",
            "--shaper", "kernel"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"{topo}: links[0].up.delay_ms: needs netem, absent on this kernel: "
                     "use --shaper userspace (or auto)"]


def test_userspace_cell_topology_all_pairs_reach():
    """Link processes on every link, a bridge for the cell, the shipped delays and losses."""
    topo = load_topology(REPO / "topologies/cell-4.yaml")
    hosts = [h.name for h in topo.hosts()]
    with EmulatedNetwork(topo, shaper="userspace") as net:
        assert net.shaper == "userspace"
        ports = [d for d in root_devices(net.run_id) if re.fullmatch(r"tb\w{5}l\d+[ab]", d)]
        assert len(ports) == 2 * len(topo.links)
        # -c 5: the cell-edge devices lose 1 % of packets; one reply out of five is enough
        procs = {(a, b): net.popen(a, ["ping", "-c", "5", "-i", "0.2", "-W", "2", net.ip(b, a)])
                 for a in hosts for b in hosts if a < b}
        outs = {pair: p.communicate(timeout=30)[0].decode() for pair, p in procs.items()}
        failed = [pair for pair, out in outs.items() if " 0 received" in out or "100% packet loss" in out]
        assert failed == []
        shells = [net.pid(h) for h in hosts]
    assert_gone(net, shells)
