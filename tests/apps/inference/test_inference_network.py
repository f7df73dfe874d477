"""``testbed infer`` across a real emulated topology (namespaces, shaped links)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.apps.inference.run import run_split_inference
from testbed.hosts.limits import resolve_limits
from testbed.model.codecs import get_codec
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.model.tiny import make_tiny_model_dir
from testbed.omp import plan_threads
from testbed.spec.topology import load_topology

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
PROMPT = [5, 17, 33, 2, 9, 41]


def _node_pids() -> set[int]:
    """Shard nodes and drivers among this test process's descendants (others may run their own)."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
    mine = {os.getpid()}
    changed = True
    while changed:
        new = {p for p, pp in parent.items() if pp in mine} - mine
        changed = bool(new)
        mine |= new
    return {p for p in mine if "shard_node.py" in cmd.get(p, "") or "driver.py" in cmd.get(p, "")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=3, hidden=64)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize(("codec", "kv"), [("fp32", True), ("int8", True), ("fp32", False)])
def test_infer_tiny_across_topology(tiny: Path, codec: str, kv: bool, tmp_path: Path) -> None:
    before = _node_pids()
    n = 8
    topo = load_topology(TOPO)
    res = run_split_inference(topo, "phone=0:1,mec=1:2,cloud=2:3", "", max_new_tokens=n,
                              codec=codec, kv_cache=kv, model=tiny, prompt_ids=PROMPT, logs=tmp_path)
    shards = [Shard.load(tiny, a, b) for a, b in ((0, 1), (1, 2), (2, 3))]
    ref = generate_split(shards, PROMPT, len(res["tokens"]), kv_cache=kv, codec=codec)
    assert res["tokens"] == ref.tokens
    assert [h["node"] for h in res["per_hop"]] == ["phone", "mec", "cloud"]
    steps = len(res["tokens"])
    positions = len(PROMPT) + steps - 1 if kv else sum(len(PROMPT) + i for i in range(steps))
    bpt = get_codec(codec).bytes_per_token(64)
    for hop in res["per_hop"][1:]:
        assert hop["payload_up"] == positions * bpt
        assert hop["bytes_down"] > 0
    # the phone-mec link has 15 ms one-way delay each way: every step pays at least one round trip
    assert res["per_hop"][1]["transfer_ms"] >= steps * 30 * 0.9
    assert res["per_hop"][2]["transfer_ms"] >= steps * 50 * 0.9
    assert min(res["token_ms"]) >= 80 * 0.9
    assert res["bytes_up"] == res["per_hop"][1]["bytes_up"]
    assert res["kv_cache"] is kv and res["codec"] == codec and res["shaper"]
    assert not _node_pids() - before, "shard nodes or drivers left running"
    # each program's CPU time and thread plan (from its node's CPU limit, three programs at once)
    for hop in res["per_hop"]:
        assert hop["cpu_ms"] is not None and hop["cpu_ms"] >= 0  # clock ticks: a tiny stage may read 0
        assert hop["threads"] == plan_threads(resolve_limits(topo.nodes[hop["node"]]).cpu, 3).threads
        name = "driver" if hop["node"] == "phone" else "shard"
        assert "READY" in (tmp_path / f"{name}-{hop['node']}.log").read_text()


@pytest.mark.root
@pytest.mark.slow
def test_infer_cli_bad_placement(tiny: Path, tmp_path: Path) -> None:
    def run(placement: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "testbed", "infer", str(TOPO), "--placement", placement,
                               "--prompt", "hi", "--model", str(tiny), "--json", "--logs", str(tmp_path)],
                              capture_output=True, text=True, timeout=60, env=dict(os.environ))
    for placement, why in [("phone=0:1,mec=1:2", "must end at layer 3"),
                           ("phone=0:1,nowhere=1:3", "no such node"),
                           ("phone=1:3", "start at layer 0"), ("phone=0:2,mec=1:3", "ends at 2"),
                           ("phone=0-3", "node=START:END"), ("phone=0:1,phone=1:3", "placed twice")]:
        r = run(placement)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("--placement: ") and why in lines[0], r.stderr


@pytest.mark.root
@pytest.mark.slow
def test_infer_cli_json_single_host(tiny: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "testbed", "infer", str(TOPO), "--placement", "phone=0:3",
                        "--prompt", "hello world", "--max-new-tokens", "4", "--model", str(tiny), "--json",
                        "--logs", str(tmp_path / "logs")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) >= {"text", "tokens", "ttft_ms", "tpot_ms", "bytes_up", "bytes_down", "per_hop", "shaper",
                        "quant", "codec", "kv_cache"}
    assert res["bytes_up"] == 0 and len(res["per_hop"]) == 1
    assert res["logs"] == str(tmp_path / "logs") and (tmp_path / "logs" / "driver-phone.log").is_file()


def test_infer_cli_bad_token_count_is_one_line(tiny: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "testbed", "infer", str(TOPO), "--placement", "phone=0:3",
                        "--prompt", "hi", "--max-new-tokens", "0", "--model", str(tiny),
                        "--logs", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "infer: --max-new-tokens: must be an integer >= 1 (got 0)"
