"""Events on a live network: a delay change and an outage on the userspace backend (pings show
both), an HTB rate change and an outage on the kernel backend (rates only: no netem needed), node
events handed to the application's callback, every application recorded with its time."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from testbed.net.events import EventScheduler
from testbed.net.network import EmulatedNetwork
from testbed.spec.events import parse_events
from testbed.spec.topology import LinkSpec, NodeSpec, Shaping, Topology


def two_node(up: Shaping, down: Shaping) -> Topology:
    return Topology(name="ev", source=Path("ev.yaml"),
                    nodes={"phone": NodeSpec("phone", "device"), "mec": NodeSpec("mec", "edge")},
                    links=[LinkSpec("phone", "mec", up, down)])


def pings(net: EmulatedNetwork, seconds: int, interval: float = 0.1) -> subprocess.Popen:
    """Pings phone -> mec every ``interval`` for ``seconds``, timestamped (-D)."""
    argv = ["ping", "-D", "-n", "-i", str(interval), "-w", str(seconds), "-W", "1", net.ip("mec", "phone")]
    return net.popen("phone", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def replies(out: str, t_wall0: float) -> list[tuple[float, float]]:
    """(seconds since ``t_wall0`` the reply arrived, rtt ms) per reply line."""
    got = []
    for m in re.finditer(r"^\[(\d+\.\d+)\].*time=([\d.]+) ms", out, re.M):
        got.append((float(m.group(1)) - t_wall0, float(m.group(2))))
    return got


@pytest.mark.root
@pytest.mark.slow
def test_change_and_outage_on_the_userspace_backend() -> None:
    topo = two_node(Shaping(bw_mbit=20, delay_ms=5), Shaping(bw_mbit=20, delay_ms=5))
    events = parse_events([{"at_s": 0.6, "link": ["mec", "phone"], "up": {"delay_ms": 40}},
                           {"at_s": 1.2, "link": ["phone", "mec"], "down_for_s": 0.8}], topo, "ev.yaml")
    with EmulatedNetwork(topo, shaper="userspace") as net:
        p = pings(net, 4)
        time.sleep(0.3)  # ping is up
        t_wall = time.time()  # the scheduler's 0 on ping's clock
        with EventScheduler(net, events) as sched:
            out, _ = p.communicate(timeout=20)
            assert sched.wait(5)
    recs = sched.records
    assert [r["kind"] for r in recs] == ["change", "outage"]
    # scheduled vs actual (a loaded machine: within a second, never early)
    for r in recs:
        assert r["at_s"] <= r["actual_s"] < r["at_s"] + 1.0, r
        assert "error" not in r, r
    assert recs[0]["down"] == {"delay_ms": 40.0} and recs[0]["link"] == ["phone", "mec"]  # mec -> phone
    out_rec = recs[1]
    assert out_rec["end_s"] == pytest.approx(2.0) and out_rec["end_s"] <= out_rec["actual_end_s"] < 3.0
    got = replies(out, t_wall)
    before = [rtt for t, rtt in got if 0 < t < 0.5]
    after_change = [rtt for t, rtt in got if out_rec["actual_end_s"] + 0.3 < t]
    during = [t for t, _ in got if recs[1]["actual_s"] + 0.1 < t < out_rec["actual_end_s"] - 0.05]
    assert before and max(before) < 40, before  # 5 + 5 ms
    assert after_change and min(after_change) >= 44, after_change  # 5 + 40 ms, back after the outage
    assert during == [], f"replies during the outage: {during}"


@pytest.mark.root
@pytest.mark.slow
def test_rate_change_and_outage_on_htb_only_kernel_backend() -> None:
    topo = two_node(Shaping(bw_mbit=20), Shaping(bw_mbit=20))
    events = parse_events([{"at_s": 0.2, "link": ["phone", "mec"], "up": {"bw_mbit": 3}},
                           {"at_s": 0.5, "link": ["phone", "mec"], "down_for_s": 0.5}], topo, "ev.yaml")

    def htb_rate(net: EmulatedNetwork, node: str) -> str:
        text = net.cmd(node, ["tc", "class", "show", "dev", f"{node}-eth0"])
        return re.search(r"rate (\S+)", text).group(1)

    with EmulatedNetwork(topo, shaper="kernel") as net:
        sched = EventScheduler(net, events)
        sched.start()
        time.sleep(0.35)
        assert htb_rate(net, "phone") == "3Mbit" and htb_rate(net, "mec") == "20Mbit"
        time.sleep(0.4)  # inside the outage: HTB's least rate, both ways
        assert htb_rate(net, "phone") == htb_rate(net, "mec") == "8Kbit"
        assert sched.wait(5)
        assert htb_rate(net, "phone") == "3Mbit" and htb_rate(net, "mec") == "20Mbit"
    assert [("error" in r) for r in sched.records] == [False, False]


def test_node_events_go_to_the_callback_and_failures_are_recorded() -> None:
    topo = two_node(Shaping(), Shaping())
    events = parse_events([{"at_s": 0.1, "kill": "mec"}, {"at_s": 0.2, "restart": "mec"},
                           {"at_s": 0.3, "link": ["phone", "mec"], "up": {"bw_mbit": 5}}], topo, "ev.yaml")
    seen = []

    class FakeNet:  # the scheduler's view of a network: no backend is needed for node events
        shaper = "userspace"

        def __init__(self) -> None:
            self.topo = topo

        def update_link(self, *a) -> None:
            raise KeyError("link down for this test")

    def on_node(e) -> str:
        seen.append((e.kind, e.node))
        return f"{e.kind} done"

    sched = EventScheduler(FakeNet(), events, on_node)
    sched.start()
    assert sched.wait(5)
    assert seen == [("kill", "mec"), ("restart", "mec")]
    assert [r.get("detail") for r in sched.records] == ["kill done", "restart done", None]
    assert "link down for this test" in sched.records[2]["error"]
    no_handler = EventScheduler(FakeNet(), events[:1])
    no_handler.start()
    assert no_handler.wait(5) and "no handler for kill" in no_handler.records[0]["error"]


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("start_s", [0.0, 1.5])
def test_trace_start_s_on_the_userspace_backend(tmp_path: Path, start_s: float) -> None:
    """A trace that carries nothing for its first 1.5 s: replay started 1.5 s in answers at once."""
    from testbed.net.shaping.userspace import netns_link

    trace = tmp_path / "late.up"
    trace.write_text("".join(f"{t}\n" for t in range(1500, 3000)))  # 12 Mbit/s in [1.5, 3) s, looping
    with netns_link(Shaping(trace=trace, format="mahimahi", trace_start_s=start_s), Shaping()) as link:
        p = link.run1(["ping", "-n", "-c", "1", "-W", "5", link.ip2], stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate(timeout=20)
    rtt = float(re.search(r"time=([\d.]+) ms", out).group(1))
    if start_s:
        assert rtt < 500, out
    else:  # the request (and its address resolution) waits for the trace's first opportunity
        assert rtt > 500, out


@pytest.mark.root
@pytest.mark.slow
def test_trace_start_s_on_the_kernel_backend(tmp_path: Path) -> None:
    """HTB replay (no netem needed) of a trace at 12 Mbit/s for 10 s, then 24: started 10 s in."""
    trace = tmp_path / "steps.up"
    trace.write_text("".join(f"{t}\n" for t in range(10_000))
                     + "".join(f"{t}\n{t}\n" for t in range(10_000, 20_000)))
    s = Shaping(trace=trace, format="mahimahi", trace_start_s=10.0)
    with EmulatedNetwork(two_node(s, Shaping(bw_mbit=9)), shaper="kernel") as net:
        time.sleep(0.3)
        text = net.cmd("phone", ["tc", "class", "show", "dev", "phone-eth0"])
    assert "rate 24Mbit" in text, text


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
"""


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("shaper", ["userspace", "kernel"])
def test_handover_moves_the_device_to_the_other_cell(tmp_path: Path, shaper: str) -> None:
    from testbed.spec.topology import load_topology

    src = tmp_path / "two-cells.yaml"
    src.write_text(TWO_CELLS + "events:\n  - {at_s: 0.1, handover: phone, from: cellA, to: cellB}\n")
    topo = load_topology(src)
    if shaper == "kernel":  # rates only: HTB needs no netem
        import dataclasses

        def rate(sh: Shaping) -> Shaping:
            return Shaping(bw_mbit=sh.bw_mbit)

        topo = dataclasses.replace(topo, links=[dataclasses.replace(lk, up=rate(lk.up), down=rate(lk.down))
                                                for lk in topo.links])
    with EmulatedNetwork(topo, shaper=shaper) as net:
        before = net.ip("phone", "mecB")
        sched = EventScheduler(net, topo.events)
        sched.start()
        assert sched.wait(10)
        (rec,) = sched.records
        assert "error" not in rec, rec
        after = net.ip("phone", "mecB")
        assert after != before and after.rsplit(".", 1)[0] == net.ip("mecB", "dev2").rsplit(".", 1)[0]
        # phone now sits on cellB: dev2 is one L2 hop away, mecA is reached through mecB
        for peer in ("dev2", "mecB", "mecA"):
            out = net.cmd("phone", ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", net.ip(peer, "phone")])
            assert " 0% packet loss" in out, (peer, out)
        route = net.cmd("mecA", ["ip", "route", "get", after])
        assert net.ip("mecB", "mecA") in route, route
        # the radio link kept its shaping: 5 ms each way (the kernel rows keep rates only: 20 Mbit/s)
        if shaper == "userspace":
            out = net.cmd("phone", ["ping", "-n", "-c", "3", "-i", "0.2", net.ip("dev2", "phone")])
            rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
            assert rtts and min(rtts) >= 9.0, out
        else:
            assert "rate 20Mbit" in net.cmd("phone", ["tc", "class", "show", "dev", "phone-eth0"])
