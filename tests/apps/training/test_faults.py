"""Faults in split training: a device that dies mid-run under sfl leaves the round to the others,
and the record names it; a node over its memory limit is a failure record, not a hang."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from testbed.apps.training import checkpoint
from testbed.apps.training.run import TrainOptions, run_training
from tests.patience import patient

REPO = Path(__file__).resolve().parents[3]
TEXT = str(REPO / "testbed" / "model" / "data" / "eval_text.txt")


def _pids(*markers: str) -> list[int]:
    """Processes whose command line holds every marker (this test's own node programs)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                line = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if all(m in line for m in markers):
                found.append(int(d))
    return found


def test_a_device_killed_mid_run_leaves_the_round_to_the_others(tiny4: Path, tmp_path: Path) -> None:
    steps = 12
    opt = TrainOptions(steps=steps, batch=2, seq=8, lr=2e-2, seed=1, evaluate=False, scheme="sfl",
                       clients=["dev1", "dev2"], data=[TEXT, TEXT], checkpoint_every=1, drop_after_s=1.5)
    out = tmp_path / "run"
    box: dict = {}

    def train() -> None:
        try:
            box["result"] = run_training(None, "dev1=0:2,mec=2:4", opt, model=tiny4, loopback=True, out=out)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            box["error"] = e

    t = threading.Thread(target=train)
    t.start()
    deadline = time.monotonic() + patient(120)
    while checkpoint.common_step(out / "checkpoints", ["client1"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    victims = _pids(str(out), '"client":1,')
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    t.join(patient(180))
    assert not t.is_alive()
    assert "error" not in box, box.get("error")
    res = box["result"]
    assert [f["node"] for f in res["failed_clients"]] == ["dev2"]
    assert len(res["losses"]) == steps  # every round completed, the later ones with dev1 alone
    dropped = res["clients_dropped"]
    assert dropped[-1] == 1 and dropped[0] == 0 and dropped == sorted(dropped)
    assert (out / "adapters" / "dev1" / "adapter_model.safetensors").is_file()
    assert "left out" in (out / "logs").joinpath(next(p.name for p in (out / "logs").iterdir()
                                                      if p.name.startswith("stage1"))).read_text()


MEMCAP = """\
name: memcap
nodes:
  phone: {role: device}
  mec:   {role: edge, memory_mb: 48}
links:
  - between: [phone, mec]
    up:   {bw_mbit: 100, delay_ms: 1}
    down: {bw_mbit: 100, delay_ms: 1}
"""


@pytest.mark.root
@pytest.mark.slow
def test_a_node_over_its_memory_limit_is_a_failure_record_not_a_hang(tiny4: Path, tmp_path: Path) -> None:
    from testbed.apps.training.run import TrainingFailed
    from testbed.spec.topology import load_topology

    (tmp_path / "memcap.yaml").write_text(MEMCAP)
    topo = load_topology(tmp_path / "memcap.yaml")
    t0 = time.monotonic()
    with pytest.raises(TrainingFailed) as caught:
        run_training(topo, "phone=0:2,mec=2:4", TrainOptions(steps=2, batch=2, seq=8, evaluate=False),
                     model=tiny4, out=tmp_path / "out")
    assert time.monotonic() - t0 < 120
    record = caught.value.record
    assert record["failed_node"] == "mec" and record["memory_mb"] == 48
    assert "most likely over mec's memory limit of 48 MB" in record["error"]
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == record
