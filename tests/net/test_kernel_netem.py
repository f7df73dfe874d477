"""The kernel backend's netem half, for real: delay, jitter, loss, queue limit, rate with delay,
CSV trace replay of delay and loss, split inference over netem links, and `testbed clean`.

These run where the kernel has sch_netem (the test guest of `make test-guest`; conftest skips
them elsewhere).  The guest is an emulated CPU (QEMU TCG, 10-15x slower than the host) on a
loaded machine: every figure is asserted as a range that holds there.

One-way delays are measured with a UDP probe whose packets carry their send time: sender and
receiver read the same CLOCK_MONOTONIC (namespaces share it), so a packet's one-way delay is
exact, and the sequence numbers show loss and order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.net.network import EmulatedNetwork
from testbed.spec.topology import LinkSpec, NodeSpec, Shaping, Topology
from tests.net.testbed_up import start_up

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.netem]

REPO = Path(__file__).resolve().parents[2]
PY = ["/usr/bin/python3", "-S", "-c"]  # no site: starts in a third of the time under emulation
PORT = 5301

# argv: dest port count interval_s size.  Each packet: seq, CLOCK_MONOTONIC at send.
SENDER = """
import socket, struct, sys, time
dest, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gap, size = float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t_next = time.monotonic()
for seq in range(count):
    s.sendto(struct.pack("!Id", seq, time.monotonic()).ljust(size, b"."), (dest, port))
    t_next += gap
    time.sleep(max(0.0, t_next - time.monotonic()))
"""
# argv: port idle_s total_s.  Prints "ready", then one JSON list [[seq, sent, received], ...].
RECEIVER = """
import json, socket, struct, sys, time
port, idle, total = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("0.0.0.0", port))
print("ready", flush=True)
got, end = [], time.monotonic() + total
s.settimeout(total)
while time.monotonic() < end:
    try:
        data = s.recv(65536)
    except socket.timeout:
        break
    now = time.monotonic()
    seq, sent = struct.unpack("!Id", data[:12])
    got.append([seq, sent, now])
    s.settimeout(idle)
print(json.dumps(got), flush=True)
"""


def two_hosts(tmp_path: Path, up: Shaping, down: Shaping | None = None) -> Topology:
    """a -- b, both unlimited (role cloud) so that only the link shapes what we measure."""
    nodes = {"a": NodeSpec("a", "cloud"), "b": NodeSpec("b", "cloud")}
    return Topology("netem", tmp_path / "netem.yaml", nodes, [LinkSpec("a", "b", up, down or Shaping())])


def udp_probe(net: EmulatedNetwork, src: str, dst: str, count: int, gap_s: float,
              size: int = 200, port: int = PORT) -> list[tuple[int, float, float]]:
    """Send ``count`` packets ``gap_s`` apart from ``src`` to ``dst``; (seq, sent, received) of each
    arrival, in arrival order."""
    rx = net.popen(dst, [*PY, RECEIVER, str(port), "3", str(60 + count * gap_s * 4)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if rx.stdout.readline().strip() != "ready":
        rx.kill()
        pytest.fail(f"UDP receiver in {dst} did not start: {rx.communicate(timeout=30)[1]}")
    tx = net.popen(src, [*PY, SENDER, net.ip(dst, src), str(port), str(count), str(gap_s), str(size)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = tx.communicate(timeout=120 + count * gap_s * 4)
    assert tx.returncode == 0, err
    out, err = rx.communicate(timeout=120 + count * gap_s * 4)
    assert rx.returncode == 0, err
    return [tuple(x) for x in json.loads(out)]


def owd_ms(arrivals: list[tuple[int, float, float]]) -> list[float]:
    return [(r - s) * 1000 for _, s, r in arrivals]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def iperf_mbit(net: EmulatedNetwork, src: str, dst: str, seconds: int = 6,
               udp_mbit: int | None = None) -> float:
    """Throughput src -> dst as the receiver saw it (TCP, or UDP at ``udp_mbit``)."""
    server = net.popen(dst, ["iperf3", "-s", "-1", "-p", "5201"])
    time.sleep(0.5)
    argv = ["iperf3", "-c", net.ip(dst, src), "-p", "5201", "-t", str(seconds), "-J", "-O", "2"]
    if udp_mbit:
        argv += ["-u", "-b", f"{udp_mbit}M", "-l", "1400"]
    out = net.cmd(src, argv)
    server.wait(timeout=30)
    end = json.loads(out)["end"]
    return (end["sum"] if udp_mbit else end["sum_received"])["bits_per_second"] / 1e6


def ping_rtts(net: EmulatedNetwork, src: str, dst: str, count: int, interval: float = 0.2) -> list[float]:
    out = net.cmd(src, ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "5", net.ip(dst, src)])
    return [float(x.split("time=")[1].split()[0]) for x in out.splitlines() if "time=" in x]


# --- delay, jitter, loss ------------------------------------------------------------------------

def test_delay_each_direction(tmp_path: Path) -> None:
    topo = two_hosts(tmp_path, Shaping(delay_ms=20), Shaping(delay_ms=10))
    with EmulatedNetwork(topo, shaper="kernel") as net:
        assert net.shaper == "kernel"
        up = owd_ms(udp_probe(net, "a", "b", 100, 0.01))
        down = owd_ms(udp_probe(net, "b", "a", 100, 0.01, port=PORT + 1))
        rtt = ping_rtts(net, "a", "b", 10)
    print(f"up one-way p0/p50/p90 {min(up):.1f}/{pct(up, .5):.1f}/{pct(up, .9):.1f} ms, "
          f"down {min(down):.1f}/{pct(down, .5):.1f} ms, ping {min(rtt):.1f}/{statistics.median(rtt):.1f} ms")
    assert len(up) == 100 and len(down) == 100
    # netem never delivers early; the emulated CPU adds a few ms, more under load
    assert 19.9 <= min(up) and pct(up, .5) <= 20 + 15
    assert 9.9 <= min(down) and pct(down, .5) <= 10 + 15
    assert 29.9 <= min(rtt) and statistics.median(rtt) <= 30 + 25


def test_jitter_spreads_delay_without_reordering(tmp_path: Path) -> None:
    """20 ms +- 10 ms on packets 1 ms apart: a plain netem would reorder most of them."""
    topo = two_hosts(tmp_path, Shaping(delay_ms=20, jitter_ms=10))
    with EmulatedNetwork(topo, shaper="kernel") as net:
        arrivals = udp_probe(net, "a", "b", 400, 0.001)
    seqs = [seq for seq, _, _ in arrivals]
    d = owd_ms(arrivals)
    reordered = sum(1 for x, y in zip(seqs, seqs[1:], strict=False) if y < x)
    print(f"{len(seqs)} arrived, {reordered} out of order, one-way p10/p50/p90 "
          f"{pct(d, .1):.1f}/{pct(d, .5):.1f}/{pct(d, .9):.1f} ms")
    assert len(seqs) == 400
    assert reordered == 0, f"{reordered} packets overtook an earlier one"
    assert min(d) >= 20 - 10 - 0.1  # never below delay - jitter
    assert pct(d, .9) - pct(d, .1) >= 3, "no delay variation: jitter not applied"
    assert pct(d, .5) <= 20 + 10 + 25


def test_loss_rate(tmp_path: Path) -> None:
    topo = two_hosts(tmp_path, Shaping(loss_pct=10))
    with EmulatedNetwork(topo, shaper="kernel") as net:
        up = udp_probe(net, "a", "b", 2000, 0.001)
        down = udp_probe(net, "b", "a", 500, 0.001, port=PORT + 1)
    lost_up = 1 - len(up) / 2000
    lost_down = 1 - len(down) / 500
    print(f"loss up {lost_up:.3f} (10 % configured), down {lost_down:.3f} (none)")
    assert 0.06 <= lost_up <= 0.14  # binomial sd 0.7 %: +-4 sd
    assert lost_down <= 0.01


# --- queue limit, rate with delay -----------------------------------------------------------------

def _loaded_rtts(tmp_path: Path, queue_pkts: int) -> list[float]:
    """RTTs a -> b while a UDP flood at 5x the 10 Mbit/s rate fills a's egress queue."""
    topo = two_hosts(tmp_path, Shaping(bw_mbit=10, delay_ms=5, queue_pkts=queue_pkts))
    with EmulatedNetwork(topo, shaper="kernel") as net:
        server = net.popen("b", ["iperf3", "-s", "-1", "-p", "5202"])
        time.sleep(0.5)
        flood = net.popen("a", ["iperf3", "-c", net.ip("b", "a"), "-p", "5202", "-u", "-b", "50M",
                                "-l", "1400", "-t", "8"])
        time.sleep(2.5)  # the queue is full long before this
        rtts = ping_rtts(net, "a", "b", 15)
        flood.wait(timeout=60)
        server.wait(timeout=30)
    return rtts


def test_queue_limit_bounds_the_queueing_delay(tmp_path: Path) -> None:
    """A full 20-packet queue at 10 Mbit/s holds 24 ms; a 400-packet one holds ~480 ms."""
    short = _loaded_rtts(tmp_path, 20)
    long = _loaded_rtts(tmp_path, 400)
    print(f"loaded RTT median: queue 20 -> {statistics.median(short):.1f} ms, "
          f"queue 400 -> {statistics.median(long):.1f} ms")
    assert short and long
    assert statistics.median(short) <= 5 + 24 + 40  # delay + full queue + emulation slack
    assert statistics.median(long) >= 200
    assert statistics.median(long) >= 4 * statistics.median(short)


def test_rate_and_delay_together_reach_the_rate(tmp_path: Path) -> None:
    """1000 Mbit/s with 25 ms: ~2100 full packets are in flight in the delay alone, so a netem
    limit that counts them (the default 1000) would cap TCP near 485 Mbit/s.  An emulated CPU
    cannot carry 1 Gbit/s, so the cap is checked where it lives (netem's limit holds the
    in-flight packets besides the rate queue), and the throughput against this machine's own
    unshaped ceiling."""
    with EmulatedNetwork(two_hosts(tmp_path, Shaping()), shaper="kernel") as net:
        ceiling = iperf_mbit(net, "a", "b")  # what this (emulated) machine carries unshaped
    topo = two_hosts(tmp_path, Shaping(bw_mbit=1000, delay_ms=25), Shaping(bw_mbit=1000))
    with EmulatedNetwork(topo, shaper="kernel") as net:
        for node in ("a", "b"):  # 25 ms at 1 Gbit/s is 3.1 MB in flight: room for twice that
            net.cmd(node, ["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 131072 16777216",
                           "net.ipv4.tcp_wmem=4096 16384 16777216"])
        qdiscs = net.cmd("a", ["tc", "qdisc", "show"])
        shaped = iperf_mbit(net, "a", "b", seconds=10)
    netem = [line for line in qdiscs.splitlines() if "netem" in line]
    limit = int(re.search(r"limit (\d+)", netem[0]).group(1)) if netem else 0
    in_flight = 1000e6 / 8 * 0.025 / 1500
    print(f"1000 Mbit/s + 25 ms: netem limit {limit} ({in_flight:.0f} full packets in flight), "
          f"{shaped:.0f} Mbit/s (unshaped ceiling here {ceiling:.0f})")
    assert netem, qdiscs
    assert limit >= in_flight + 100, qdiscs
    assert shaped <= 1000 * 1.05
    # a working link, no more: TCP over 25 ms on an emulated CPU reached 132 Mbit/s with 567 unshaped
    assert shaped >= 0.1 * min(1000.0, ceiling), (shaped, ceiling)


# --- trace replay of delay and loss -------------------------------------------------------------

def test_csv_trace_replays_delay_and_loss(tmp_path: Path) -> None:
    """Two 4 s steps, looping: (20 Mbit/s, 10 ms, 0 %) then (20 Mbit/s, 60 ms, 30 %)."""
    from testbed.spec.traces import load_trace

    path = tmp_path / "steps.csv"
    path.write_text("time_s,bw_mbit,delay_ms,loss_pct\n0,20,10,0\n4,20,60,30\n")
    trace = load_trace(path, "csv")
    topo = two_hosts(tmp_path, Shaping(trace=path, format="csv"))
    count, gap = 1600, 0.01
    with EmulatedNetwork(topo, shaper="kernel") as net:
        arrivals = udp_probe(net, "a", "b", count, gap)  # 16 s: every step at least twice
        t0 = net.trace_t0
    assert t0 is not None and arrivals
    by_seq = {seq: (sent, got) for seq, sent, got in arrivals}
    first_seq, (first_sent, _) = min(by_seq.items())
    owd: dict[float, list[float]] = {10.0: [], 60.0: []}
    sent: dict[float, int] = {10.0: 0, 60.0: 0}
    for seq in range(count):
        # a lost packet's send time from the sender's pacing
        t = by_seq[seq][0] if seq in by_seq else first_sent + (seq - first_seq) * gap
        step = trace.step_at(t - t0)
        # only packets well inside a step (the replay changes netem on 100 ms bins)
        if step is None or any(trace.step_at(t - t0 + d) != step for d in (-0.3, 0.3)):
            continue
        sent[step.delay_ms] += 1
        if seq in by_seq:
            owd[step.delay_ms].append((by_seq[seq][1] - by_seq[seq][0]) * 1000)
    loss = {k: 1 - len(owd[k]) / sent[k] for k in owd}
    med = {k: statistics.median(owd[k]) for k in owd}
    print(f"10 ms / 0 % step: median one-way {med[10.0]:.1f} ms, loss {loss[10.0]:.3f}; "
          f"60 ms / 30 % step: {med[60.0]:.1f} ms, {loss[60.0]:.3f}")
    assert sent[10.0] > 300 and sent[60.0] > 300, sent
    assert 9.9 <= med[10.0] <= 10 + 20 and loss[10.0] <= 0.02
    assert 59.9 <= med[60.0] <= 60 + 20 and 0.2 <= loss[60.0] <= 0.4


# --- an application over netem links --------------------------------------------------------------

CHAIN_TOPO = """
name: netemchain
nodes:
  phone: {role: device}
  mec: {role: edge}
  cloud: {role: cloud}
links:
  - between: [phone, mec]
    up: {delay_ms: 15, jitter_ms: 2}
    down: {delay_ms: 15}
  - between: [mec, cloud]
    up: {bw_mbit: 100, delay_ms: 10}
    down: {bw_mbit: 100, delay_ms: 10}
"""


SPLIT = """
import json, sys
from testbed.apps.inference.run import run_split_inference
from testbed.spec.topology import load_topology
res = run_split_inference(load_topology(sys.argv[2]), "phone=0:1,mec=1:2,cloud=2:3", "", max_new_tokens=4,
                          codec="fp32", kv_cache=True, model=sys.argv[1], prompt_ids=json.loads(sys.argv[3]),
                          shaper="kernel")
print(json.dumps({k: res[k] for k in ("tokens", "token_ms", "shaper")}))
"""


@pytest.mark.guest_slow
def test_tiny_split_inference_over_netem_links(tmp_path: Path) -> None:
    """Three shards of a tiny model over delayed, jittered links: the same tokens as locally,
    and every step pays at least the configured delays.  In a child process with a deadline:
    shard programs start slowly on an emulated CPU, and a stuck run must not eat the budget."""
    from testbed.model.generate import generate_split
    from testbed.model.shard import Shard
    from testbed.model.tiny import make_tiny_model_dir
    from testbed.net.clean import clean

    tiny = make_tiny_model_dir(tmp_path / "tiny", n_layers=3, hidden=64)
    topo_file = tmp_path / "chain.yaml"
    topo_file.write_text(CHAIN_TOPO)
    prompt = [5, 17, 33, 2, 9, 41]
    p = subprocess.Popen([sys.executable, "-c", SPLIT, str(tiny), str(topo_file), json.dumps(prompt)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        out, err = p.communicate(timeout=float(os.environ.get("TESTBED_SPLIT_TIMEOUT_S", "300")))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        clean(all_runs=False)  # the killed run's namespaces and devices
        pytest.fail("split inference over netem links did not finish in time")
    assert p.returncode == 0, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    shards = [Shard.load(tiny, a, b) for a, b in ((0, 1), (1, 2), (2, 3))]
    ref = generate_split(shards, prompt, len(res["tokens"]), kv_cache=True, codec="fp32")
    print(f"shaper {res['shaper']}, token ms {[round(t) for t in res['token_ms']]}")
    assert res["shaper"] == "kernel"
    assert res["tokens"] == ref.tokens
    # phone -> mec -> cloud and back: 2 x (15 + 10) ms of configured delay per token at least
    assert min(res["token_ms"]) >= 2 * (15 + 10) - 1


# --- cleanup ------------------------------------------------------------------------------------

CLEAN_TOPO = """
name: netemclean
nodes:
  phone: {role: device, cpu: 0.5, memory_mb: 256}
  mec: {role: edge}
links:
  - between: [phone, mec]
    up: {delay_ms: 10, jitter_ms: 2, loss_pct: 1, trace: steps.csv}
    down: {delay_ms: 5}
"""


def test_clean_after_a_killed_run_leaves_nothing(tmp_path: Path) -> None:
    """`testbed up` with netem links, a replayed trace and limited hosts, SIGKILLed: `testbed clean`
    removes every device, process, cgroup and state file of the run."""
    from testbed.net.clean import leftovers

    (tmp_path / "steps.csv").write_text("0,20,10,0\n1,10,20,1\n2,20,10,0\n")
    topo = tmp_path / "clean.yaml"
    topo.write_text(CLEAN_TOPO)
    p, run_id = start_up(topo, "--shaper", "kernel", timeout_s=240)
    time.sleep(1.0)
    before = leftovers(run_id)
    assert before["processes"] and before["cgroups"] and before["state"], before  # the run really exists
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    r = subprocess.run([sys.executable, "-m", "testbed", "clean"], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=240)
    assert r.returncode == 0, r.stderr
    after = leftovers(run_id)
    assert after == {"devices": [], "processes": [], "cgroups": [], "state": []}, after
