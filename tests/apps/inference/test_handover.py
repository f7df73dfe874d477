"""A handover during split inference: the device moves from cellA to cellB, its driver moves the session
to cellB's edge (a new connection from its new address, the KV cache rebuilt there by a re-prefill), the
tokens are the fault-free ones and the record shows the handover's cost."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from testbed.apps.inference.recovery import handover_signal, moved_to
from testbed.apps.inference.run import run_split_inference
from testbed.apps.inference.split_client import SplitClient
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.spec.topology import load_topology
from tests.apps.inference.threaded_node import Node
from tests.net.test_events import TWO_CELLS as CELLS

PROMPT = [3, 1, 4, 1, 5]
N = 100  # ~25 ms a token over a 20 ms round trip: the handover falls inside
# phone starts on cellA (edge mecA) and moves to cellB (edge mecB, with dev2: a cell has two links or more);
# the edges are linked to each other
TWO_CELLS = CELLS + """events:
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
    # the driver is signalled once the network moved, before the event handler returns (its actual_s)
    assert 0 < h["move_ms"] < 5000 and 0 < h["notice_ms"] < h["move_ms"] + 2000
    assert h["rebuild_ms"] > 0 and h["tokens_affected"] >= 1
    assert 0 <= h["step"] < N
    # the step that met the handover waited for it; the others did not
    assert res["token_ms"][h["step"]] >= h["rebuild_ms"]


def test_handover_signals() -> None:
    assert handover_signal(0) == signal.SIGRTMIN and handover_signal(2) == signal.SIGRTMIN + 2
    with pytest.raises(ValueError):
        handover_signal(signal.SIGRTMAX)
    # the wakeup fd delivers every handled signal's number: SIGTERM is no handover, the last one counts
    assert moved_to(bytes([signal.SIGTERM]), 2) is None
    assert moved_to(bytes([signal.SIGRTMIN + 1, signal.SIGTERM, signal.SIGRTMIN]), 2) == 0
    assert moved_to(bytes([signal.SIGRTMIN + 2]), 2) is None  # no such candidate


def test_the_client_moves_its_session_on_the_signal(tiny2: Path) -> None:
    """In this process (shard servers in threads): the signal arrives mid-generation, the client
    connects to the other candidate and re-prefills there; the tokens are the fault-free ones."""
    shards = [Shard.load(tiny2, 0, 1), Shard.load(tiny2, 1, 2)]
    a, b = Node(shards[1], None), Node(shards[1], None)
    client = SplitClient(shards[0], a.addr, layers=["0:1", "1:2"], timeout_s=30, next_standbys=[b.addr],
                         routes=[["phone"], ["mecA", "mecB"]], floor_ms=2000.0)
    try:
        client.listen_for_handovers()
        client.connect()
        def move() -> None:  # after 20 tokens: mid-generation whatever the machine's speed
            while len(getattr(client, "partial", {}).get("tokens", [])) < 20:
                time.sleep(0.001)
            os.kill(os.getpid(), handover_signal(1))

        threading.Thread(target=move, daemon=True).start()
        got = client.generate(torch.tensor([PROMPT]), N, set())
    finally:
        client.close()
        for n in (a, b):
            n.die()
    ref = generate_split(shards, PROMPT, N)
    assert got["tokens"] == ref.tokens and got["recoveries"] == []
    (h,) = got["handovers"]
    assert (h["from_node"], h["to_node"], h["stage"]) == ("mecA", "mecB", 1)
    assert h["rebuild_ms"] > 0 and 20 <= h["step"] < N
    # mecB: the re-prefill, then every later step; mecA: every earlier step (and the one in flight, if
    # it answered before the client moved)
    assert b.server.served == N - h["step"] and a.server.served in (h["step"], h["step"] + 1)
