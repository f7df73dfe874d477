"""A handover during split inference: the device moves from cellA to cellB, its driver moves the session
to cellB's edge (a new connection from its new address, the KV cache rebuilt there by a re-prefill), the
tokens are the fault-free ones and the record shows the handover's cost."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.inference.run import run_split_inference
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.spec.topology import load_topology

PROMPT = [3, 1, 4, 1, 5]
N = 100  # ~25 ms a token over a 20 ms round trip: the handover falls inside
# phone starts on cellA (edge mecA) and moves to cellB (edge mecB, with dev2: a cell has two links or more);
# the edges are linked to each other
TWO_CELLS = """
name: two-cells
nodes:
  phone: {role: device}
  dev2:  {role: device}
  cellA: {role: cell}
  cellB: {role: cell}
  mecA:  {role: edge}
  mecB:  {role: edge}
links:
  - between: [phone, cellA]
    up: {bw_mbit: 20, delay_ms: 5}
    down: {bw_mbit: 20, delay_ms: 5}
  - between: [cellA, mecA]
  - between: [dev2, cellB]
  - between: [cellB, mecB]
  - between: [mecA, mecB]
    up: {delay_ms: 10}
    down: {delay_ms: 10}
events:
  - {at_s: 0.8, handover: phone, from: cellA, to: cellB}
"""


@pytest.mark.root
@pytest.mark.slow
def test_handover_moves_the_session_to_the_new_edge(tiny2: Path, tmp_path: Path) -> None:
    src = tmp_path / "two-cells.yaml"
    src.write_text(TWO_CELLS)
    res = run_split_inference(load_topology(src), "phone=0:1,mecA|mecB=1:2", "", max_new_tokens=N,
                              model=tiny2, prompt_ids=PROMPT, shaper="userspace", logs=tmp_path / "logs",
                              detect_floor_ms=2000.0)
    ref = generate_split([Shard.load(tiny2, 0, 1), Shard.load(tiny2, 1, 2)], PROMPT, N)
    assert res["tokens"] == ref.tokens  # greedy fp32: the move changes nothing but time
    (ev,) = res["events"]
    assert ev["kind"] == "handover" and "error" not in ev, ev
    assert "stage 1 moves to mecB" in ev["detail"]
    assert res["recoveries"] == []  # told, not found by a deadline
    (h,) = res["handovers"]
    assert (h["from_node"], h["to_node"], h["event"]) == ("mecA", "mecB", 0)
    assert (h["from"], h["to"]) == ("cellA", "cellB")
    assert 0 < h["move_ms"] < 5000 and h["move_ms"] <= h["notice_ms"] < h["move_ms"] + 2000
    assert h["rebuild_ms"] > 0 and h["tokens_affected"] >= 1
    assert 0 <= h["step"] < N
    # the step that met the handover waited for it; the others did not
    assert res["token_ms"][h["step"]] >= h["rebuild_ms"]
