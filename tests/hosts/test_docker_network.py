"""A device-edge topology whose nodes are containers: reachability, shaping, placement, logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.hosts import docker_engine as de

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

TOPO = """name: dock
nodes:
  phone: {{role: device, cpu: 0.5, runtime: {phone}}}
  mec:   {{role: edge, runtime: {mec}}}
links:
  - between: [phone, mec]
    up:   {{bw_mbit: 10}}
    down: {{bw_mbit: 50}}
"""


def _topo(tmp_path: Path, phone: str = "docker", mec: str = "docker"):
    from testbed.spec.topology import load_topology

    f = tmp_path / "dock.yaml"
    f.write_text(TOPO.format(phone=phone, mec=mec))
    return load_topology(f)


def _iperf(net, client_node: str, server_node: str, reverse: bool) -> float:
    """TCP goodput client -> server (or server -> client with ``reverse``), Mbit/s, via iperf3 -J."""
    srv = net.popen(server_node, ["iperf3", "-s", "-1", "-p", "5301"])
    try:
        time.sleep(0.5)
        argv = ["iperf3", "-c", net.ip(server_node, client_node), "-p", "5301", "-t", "4", "-O", "1", "-J"]
        out = net.cmd(client_node, argv + (["-R"] if reverse else []))
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        srv.kill()
        srv.wait()


def _labelled(client, run_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{de.RUN_LABEL}={run_id}"})


def test_containers_as_hosts_ping_shape_and_limits(client, tmp_path: Path, monkeypatch) -> None:
    from testbed.net.network import EmulatedNetwork

    results = tmp_path / "results"
    monkeypatch.setenv("TESTBED_RESULTS_DIR", str(results))
    with EmulatedNetwork(_topo(tmp_path), shaper="kernel") as net:
        run_id = net.run_id
        conts = {c.labels[de.NODE_LABEL]: c for c in _labelled(client, run_id)}
        assert set(conts) == {"phone", "mec"}
        phone = conts["phone"]
        assert phone.labels[de.LABEL] == "1"
        host_cfg = phone.attrs["HostConfig"]
        assert host_cfg["NanoCpus"] == 500_000_000 and host_cfg["NetworkMode"] == "none"
        assert host_cfg["Memory"] == 2048 * 1024 * 1024  # device role default
        # the node's processes run in the container: its filesystem, hostname and cgroup
        out = net.cmd("phone", ["sh", "-c", "hostname; test -e /etc/edgellm-node && echo in-docker; "
                                            "grep -E ':cpu(,cpuacct)?:' /proc/self/cgroup"])
        assert out.splitlines()[0] == "phone" and "in-docker" in out and phone.id in out
        # the host's venv and repo work inside (torch's MKL included), in the caller's directory
        code = "import os, torch; x = torch.ones(64, 64); print(os.getcwd(), int((x @ x).sum()))"
        p = net.popen("phone", [sys.executable, "-c", code], cwd=str(REPO))
        out, err = p.communicate(timeout=120)
        assert out.decode().split() == [str(REPO), str(64**3)], err.decode()[-500:]
        ping = net.cmd("phone", ["ping", "-c", "3", "-i", "0.2", net.ip("mec", "phone")])
        assert " 0% packet loss" in ping
        up = _iperf(net, "phone", "mec", reverse=False)
        down = _iperf(net, "phone", "mec", reverse=True)
    print(f"docker: up {up:.2f} Mbit/s (shaped 10), down {down:.2f} Mbit/s (shaped 50)")
    assert 8.5 <= up <= 10.5, up
    assert 42 <= down <= 52, down
    assert _labelled(client, run_id) == []  # removed at teardown
    assert not list(Path("/sys/fs/cgroup").glob(f"*/testbed/{run_id}"))  # and their cgroups
    logs = {p.name for p in results.iterdir()}
    assert f"edgellm-{run_id}-phone.log" in logs and f"edgellm-{run_id}-phone.inspect.json" in logs
    assert "phone up:" in (results / f"edgellm-{run_id}-phone.log").read_text()


def test_mixed_runtimes_and_override(client, tmp_path: Path) -> None:
    """A container and a process host on one link; ``--runtime process`` overrides per-node docker."""
    from testbed.net.network import EmulatedNetwork

    with EmulatedNetwork(_topo(tmp_path, phone="docker", mec="process"), shaper="kernel") as net:
        assert [c.labels[de.NODE_LABEL] for c in _labelled(client, net.run_id)] == ["phone"]
        assert " 0% packet loss" in net.cmd("mec", ["ping", "-c", "2", "-i", "0.2", net.ip("phone", "mec")])
        marker = ["sh", "-c", "test -e /etc/edgellm-node && echo in-docker; true"]
        assert "in-docker" in net.cmd("phone", marker) and "in-docker" not in net.cmd("mec", marker)
    with EmulatedNetwork(_topo(tmp_path), shaper="kernel", runtime="process") as net:
        assert _labelled(client, net.run_id) == []
        assert " 0% packet loss" in net.cmd("phone", ["ping", "-c", "1", net.ip("mec", "phone")])


def test_popen_terminate_stops_the_process_in_the_container(client, tmp_path: Path) -> None:
    from testbed.net.network import EmulatedNetwork

    with EmulatedNetwork(_topo(tmp_path), shaper="kernel", runtime="docker") as net:
        p = net.popen("phone", ["sleep", "300"])
        time.sleep(0.3)
        assert p.poll() is None
        p.terminate()
        assert p.wait(timeout=5) == -15
        r = subprocess.run(["true"])  # the shell still answers after a child was killed
        assert r.returncode == 0 and net.cmd("phone", ["echo", "alive"]).strip() == "alive"


def test_memory_limit_is_enforced_in_the_container(client, tmp_path: Path) -> None:
    from testbed.net.network import EmulatedNetwork
    from testbed.spec.topology import load_topology

    f = tmp_path / "mem.yaml"
    f.write_text("name: mem\nnodes:\n  phone: {role: device, memory_mb: 96, runtime: docker}\n"
                 "  mec: {role: edge}\nlinks:\n  - between: [phone, mec]\n")
    alloc = "import sys; b = b'x' * (int(sys.argv[1]) << 20); print('ok')"  # touches every page
    with EmulatedNetwork(load_topology(f), shaper="kernel") as net:
        small = net.popen("phone", ["python3", "-c", alloc, "16"])
        big = net.popen("phone", ["python3", "-c", alloc, "400"])
        assert small.communicate(timeout=60)[0].strip() == b"ok" and small.returncode == 0
        big.communicate(timeout=60)
        assert big.returncode == -9  # OOM-killed by the container's memory cgroup
