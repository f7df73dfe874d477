"""Suite sessions on loopback: two devices share one shard node, each with its own driver."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.sessions import Request, run_sessions
from testbed.model.generate import generate_split
from testbed.model.loading import format_prompt, load_tokenizer
from testbed.model.shard import Shard
from testbed.spec.topology import load_topology

TOPO = """\
name: two-phones
nodes:
  phone1: {role: device}
  phone2: {role: device}
  mec: {role: edge}
links:
  - between: [phone1, mec]
  - between: [phone2, mec]
"""


@pytest.mark.slow
def test_two_devices_share_a_shard_node(tiny2: Path, loopback_net, tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(TOPO)
    net = loopback_net(load_topology(tmp_path / "t.yaml"))
    chains = [[Stage(dev, 0, 1), Stage("mec", 1, 2)] for dev in ("phone1", "phone2")]
    req = Request(prompt="hello world", max_new_tokens=5, codec="fp16", timeout_s=300)
    t0 = time.monotonic()
    out = run_sessions(net, chains, tiny2, req, t0, logs=tmp_path / "logs", ports=[free_port()])
    assert net.all_stopped()
    ids = format_prompt(load_tokenizer(tiny2), "hello world")
    shards = [Shard.load(tiny2, 0, 1), Shard.load(tiny2, 1, 2)]
    ref = generate_split(shards, ids, 5, codec="fp16").tokens
    for res in out["sessions"]:
        n = len(res["tokens"])
        assert res["tokens"] == ref[:n] and n >= 1
        assert 0 < res["gen_start_s"] < time.monotonic() - t0
    # every program's CPU time from its ready line: the shared node served both sessions
    assert set(out["cpu_ms"]) == {"mec", "phone1", "phone2"}
    assert all(v is not None and v >= 0 for v in out["cpu_ms"].values()), out["cpu_ms"]  # clock ticks
    assert 0 < out["wall_s"] < time.monotonic() - t0
    logs = tmp_path / "logs"
    assert out["logs"] == str(logs)
    assert sorted(p.name for p in logs.iterdir()) == ["driver-phone1.log", "driver-phone2.log",
                                                      "shard-mec.log"]


def test_devices_on_different_segments_are_refused(tiny2: Path, loopback_net, tmp_path: Path) -> None:
    from testbed.apps.inference.run import InferenceError

    (tmp_path / "t.yaml").write_text(TOPO)
    net = loopback_net(load_topology(tmp_path / "t.yaml"))
    net.ip = lambda node, peer=None: f"127.0.0.{1 if peer == 'phone1' else 2}"
    chains = [[Stage(dev, 0, 1), Stage("mec", 1, 2)] for dev in ("phone1", "phone2")]
    with pytest.raises(InferenceError, match="share one segment"):
        run_sessions(net, chains, tiny2, Request("hi", 2), 0.0, logs=tmp_path)
    assert net.procs == {}  # refused before anything started
