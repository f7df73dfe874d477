"""Split inference with events: a 2-second outage of the device's link during generation ends without a
hang, the output is the fault-free output, per-token latency shows the stall, the events are
recorded with their times; a bad ``--events`` file is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import cli
from testbed.apps.inference.run import run_split_inference
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.spec.events import parse_events
from testbed.spec.topology import LinkSpec, NodeSpec, Shaping, Topology

REPO = Path(__file__).resolve().parents[3]
PROMPT = [5, 17, 33, 2, 9, 41]


def two_node() -> Topology:
    s = Shaping(bw_mbit=20, delay_ms=10)
    return Topology(name="ev", source=REPO / "ev.yaml",
                    nodes={"phone": NodeSpec("phone", "device"), "mec": NodeSpec("mec", "edge")},
                    links=[LinkSpec("phone", "mec", s, s)])


@pytest.mark.root
@pytest.mark.slow
def test_generation_rides_out_an_outage(tiny2: Path, tmp_path: Path) -> None:
    topo = two_node()
    outage_s = 1.5
    events = parse_events([{"at_s": 0.5, "link": ["phone", "mec"], "down_for_s": outage_s}], topo, "ev.yaml")
    n = 40  # ~25 ms a token over a 20 ms round trip: generation outlasts the outage's start
    res = run_split_inference(topo, "phone=0:1,mec=1:2", "", max_new_tokens=n, model=tiny2,
                              prompt_ids=PROMPT, shaper="userspace", logs=tmp_path, events=events)
    ref = generate_split([Shard.load(tiny2, 0, 1), Shard.load(tiny2, 1, 2)], PROMPT, n)
    assert res["tokens"] == ref.tokens  # greedy fp32: the outage changes nothing but time
    (ev,) = res["events"]
    assert ev["kind"] == "outage" and "error" not in ev
    assert ev["at_s"] <= ev["actual_s"] < ev["at_s"] + 1.0
    assert ev["end_s"] <= ev["actual_end_s"] < ev["end_s"] + 1.0
    # the token in flight when the link went out waited at least until it came back
    ends = [res["gen_start_s"] + sum(res["token_ms"][:i + 1]) / 1e3 for i in range(len(res["token_ms"]))]
    stalled = [ms for ms, t in zip(res["token_ms"], ends, strict=True) if t > ev["actual_s"]]
    assert stalled, "generation ended before the outage"
    assert max(res["token_ms"]) >= (ev["actual_end_s"] - ev["actual_s"]) * 1e3 * 0.8
    assert sorted(res["token_ms"])[len(res["token_ms"]) // 2] < 500  # the other tokens did not stall


def test_bad_events_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ev = tmp_path / "ev.yaml"
    ev.write_text("events:\n  - {at_s: 1, link: [phone, cloud], down_for_s: 2}\n")
    topo = str(REPO / "topologies" / "device-edge-cloud.yaml")
    args = ["infer", topo, "--placement", "phone=0:30", "--prompt", "hi", "--events"]
    assert cli.main([*args, str(ev)]) == 2
    assert capsys.readouterr().err == (f"{ev}: events[0].link: no link between phone and cloud in "
                                       "device-edge-cloud.yaml (got ['phone', 'cloud'])\n")
    assert cli.main([*args, str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"infer: --events: {tmp_path / 'none.yaml'}: file not found\n"
