"""Without a Docker engine, ``runtime: docker`` fails with one clear line; ``process`` still works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.hosts import docker_engine as de
from testbed.spec.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
NO_ENGINE = "unix:///nonexistent/edgellm-no-docker.sock"


def test_engine_error_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    with pytest.raises(de.DockerUnavailable) as e:
        de.engine("topo.yaml", "nodes.phone.runtime")
    msg = str(e.value)
    assert isinstance(e.value, SpecError) and "\n" not in msg
    assert msg.startswith("topo.yaml: nodes.phone.runtime: docker runtime needs a running Docker engine")


def test_images_command_says_so_and_exits_2() -> None:
    # this checkout's testbed (cwd first on sys.path), with the interpreter running the tests
    r = subprocess.run([sys.executable, "-m", "testbed", "images"], capture_output=True, text=True, cwd=REPO,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DOCKER_HOST": NO_ENGINE}, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a running Docker engine" in lines[0], r.stderr


@pytest.mark.root
@pytest.mark.slow
def test_docker_topology_fails_cleanly_and_process_runtime_still_works(tmp_path: Path, monkeypatch) -> None:
    from testbed.net.network import EmulatedNetwork
    from testbed.spec.topology import load_topology

    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    f = tmp_path / "t.yaml"
    f.write_text("name: nodock\nnodes:\n  phone: {role: device, runtime: docker}\n  mec: {role: edge}\n"
                 "links:\n  - between: [phone, mec]\n")
    topo = load_topology(f)
    with pytest.raises(SpecError) as e:
        EmulatedNetwork(topo, shaper="kernel").start()
    assert "nodes.phone.runtime" in str(e.value) and "\n" not in str(e.value)
    with EmulatedNetwork(topo, shaper="kernel", runtime="process") as net:
        assert " 0% packet loss" in net.cmd("phone", ["ping", "-c", "1", net.ip("mec", "phone")])
