"""The backend's ceiling: measured with real traffic through scratch namespaces, cached per machine,
and the warning that names every link direction configured above it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.net import capabilities
from testbed.spec.topology import load_topology

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.root, pytest.mark.slow]


def check_measured(c: capabilities.Ceiling, backend: str) -> None:
    share = capabilities.TCP_PAYLOAD / capabilities.RATE_BYTES
    assert c.backend == backend and not c.from_cache
    assert c.raw_goodput_mbit > 20, c  # even a loaded 2-core machine forwards this much
    # the ceiling is the last rung tried, and that rung carried FAITHFUL of its rate (or was the last one)
    rate, got = c.ladder[-1]
    assert c.mbit == rate and rate <= c.raw_goodput_mbit / share * 1.01
    assert got >= capabilities.FAITHFUL * rate * share or len(c.ladder) == len(capabilities.LADDER), c
    for r, g in c.ladder[:-1]:  # every rung above it fell short
        assert g < capabilities.FAITHFUL * r * share, c


def test_userspace_ceiling_measured_cached_and_corrupt_cache_measured_again(tmp_path: Path) -> None:
    first = capabilities.ceiling("userspace", tmp_path)
    check_measured(first, "userspace")
    entry = json.loads(first.path.read_text())
    assert entry["kernel"] == os.uname().release and entry["ceiling_mbit"] == first.mbit
    mtime = first.path.stat().st_mtime_ns

    second = capabilities.ceiling("userspace", tmp_path)  # read back, nothing measured
    assert second.from_cache and second.mbit == first.mbit and second.ladder == first.ladder
    assert first.path.stat().st_mtime_ns == mtime

    first.path.write_text('{"backend": "userspace", "ceiling_mbit": "fast"')  # torn / corrupt
    third = capabilities.ceiling("userspace", tmp_path)
    check_measured(third, "userspace")
    assert json.loads(third.path.read_text())["ceiling_mbit"] == third.mbit  # rewritten whole
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_kernel_ceiling_with_htb(tmp_path: Path) -> None:
    if not capabilities.probe().htb:
        pytest.skip("no HTB qdisc on this kernel")
    c = capabilities.ceiling("kernel", tmp_path)
    check_measured(c, "kernel")
    assert capabilities.ceiling("kernel", tmp_path).from_cache


def test_cache_entry_for_another_key_is_not_used(tmp_path: Path) -> None:
    key = capabilities._cache_key("userspace")
    path = tmp_path / "c.json"
    good = {"ceiling_mbit": 500.0, "raw_goodput_mbit": 900.0, "ladder": [[900.0, 400.0], [500.0, 480.0]]}
    capabilities._write_cache(path, key, good)
    assert capabilities._read_cache(path, key)["ceiling_mbit"] == 500.0
    for other in ({**key, "kernel": "0.0-other"}, {**key, "version": key["version"] + 1},
                  {**key, "backend": "kernel"}):
        assert capabilities._read_cache(path, other) is None
    for bad in ({**good, "ceiling_mbit": float("nan")}, {**good, "ceiling_mbit": -1}, {**good, "ladder": 3}):
        path.write_text(json.dumps({**key, **bad}))
        assert capabilities._read_cache(path, key) is None


def test_warning_names_each_direction_above_the_ceiling_and_trace_peaks(tmp_path: Path) -> None:
    ceil = capabilities.ceiling("userspace")  # this machine's (cached after the first run)
    peak = 2 * ceil.mbit
    trace = tmp_path / "fast.csv"
    trace.write_text(f"time_s,bw_mbit\n0,5\n1,{peak}\n2,5\n")
    topo = tmp_path / "t.yaml"
    topo.write_text(f"""
name: t
nodes: {{a: {{role: device}}, b: {{role: edge}}, c: {{role: cloud}}}}
links:
  - between: [a, b]
    up: {{bw_mbit: {ceil.mbit / 2:.0f}}}
    down: {{trace: {trace}}}
  - between: [b, c]
    up: {{bw_mbit: 50000}}
    down: {{bw_mbit: 50000}}
""")
    lines = capabilities.over_ceiling(load_topology(topo), ceil)
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"warning: {topo}: links[0] a<->b down trace peak {peak:.0f} Mbit/s is "
                               f"above what the userspace backend carries on this machine "
                               f"(~{ceil.mbit:.0f} Mbit/s)")
    assert lines[1].startswith(f"warning: {topo}: links[1] b<->c up 50000 Mbit/s is above")
    assert "links[1] b<->c down 50000 Mbit/s" in lines[2]
    assert all(line.endswith("measurements on this link will be capped") for line in lines)


def up_stderr(topo: Path) -> str:
    """`testbed up --no-cli` until it is ready, then SIGTERM; its stderr."""
    argv = [sys.executable, "-m", "testbed", "up", str(topo), "--no-cli", "--shaper", "userspace"]
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("ready"):
                break
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode in (0, 128 + signal.SIGTERM), err[-2000:]
    return err


def test_up_warns_for_a_link_above_the_ceiling_and_not_for_the_shipped_demo(tmp_path: Path) -> None:
    fast = tmp_path / "fast.yaml"
    fast.write_text((REPO / "topologies/device-edge-cloud.yaml").read_text()
                    .replace("{bw_mbit: 200, delay_ms: 25}", "{bw_mbit: 50000, delay_ms: 25}"))
    err = up_stderr(fast)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert f"warning: {fast}: links[1] mec<->cloud up 50000 Mbit/s is above what the userspace backend" in err
    assert f"warning: {fast}: links[1] mec<->cloud down 50000 Mbit/s is above" in err
    assert "Traceback" not in err

    err = up_stderr(REPO / "topologies/device-edge-cloud.yaml")
    assert "warning" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", ["device-edge-cloud.yaml", "cell-4.yaml", "chain-4hop.yaml", "two-node.yaml",
                                  "trace-lte.yaml"])
def test_shipped_topologies_stay_below_the_ceiling(name: str) -> None:
    assert capabilities.over_ceiling(load_topology(REPO / "topologies" / name),
                                     capabilities.ceiling("userspace")) == []
