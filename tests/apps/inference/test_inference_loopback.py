"""Split inference with shard nodes as real subprocesses over loopback ZeroMQ (tiny model)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from testbed.apps.inference.activations import hidden_message
from testbed.apps.inference.local_chain import loopback_chain
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import driver_program, driver_result, shard_program
from testbed.apps.inference.split_client import SessionEvicted, SplitClient, SplitError
from testbed.apps.launch import Launcher, LocalHost, encode_settings
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.model.tiny import make_tiny_model_dir
from testbed.wire import message as m
from testbed.wire.message import Kind, parse

REPO = Path(__file__).resolve().parents[3]
STAGES = [Stage("dev", 0, 1), Stage("edge", 1, 2), Stage("cloud", 2, 3)]
PROMPTS = [[5, 17, 33, 2, 9], [100, 4, 4, 61], [7], [250, 251, 3, 8, 12, 40, 41]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=3, hidden=64)


@pytest.fixture(scope="module")
def shards(tiny: Path) -> list[Shard]:
    return [Shard.load(tiny, s.start, s.end) for s in STAGES]


def reference(shards, ids: list[int], n: int, kv: bool = True, codec: str = "fp32") -> list[int]:
    out = generate_split(shards, list(ids), n, kv_cache=kv, codec=codec)
    return [int(t) for t in out.tokens]


def ping(addr: str) -> list[int]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    try:
        sock.send_multipart(m.control(Kind.PING).frames())
        assert sock.poll(5000), "no PONG"
        return parse(sock.recv_multipart()).tensor().tolist()
    finally:
        sock.close(0)


@pytest.mark.slow
@pytest.mark.parametrize("kv", [True, False])
def test_split_matches_in_process_reference(tiny, shards, kv: bool, tmp_path: Path) -> None:
    with loopback_chain(tiny, STAGES, logs=tmp_path) as addrs:
        for ids in PROMPTS[:2]:
            client = SplitClient(shards[0], addrs[1], codec="fp32", kv_cache=kv,
                                 layers=[s.layers for s in STAGES], timeout_s=60)
            try:
                got = client.generate(torch.tensor([ids]), 12, stop_ids=set())
            finally:
                client.close()
            assert got["tokens"] == reference(shards, ids, 12, kv)
            assert len(got["token_ms"]) == 12 and got["ttft_ms"] > 0 and got["tpot_ms"] > 0
            hops = got["per_hop"]
            assert [h["layers"] for h in hops] == ["0:1", "1:2", "2:3"]
            assert all(h["compute_ms"] > 0 for h in hops)
            # activation bytes on each link: every position sent once with the cache, the whole
            # sequence every step without it (4 bytes x hidden 64 per position)
            positions = len(ids) + 11 if kv else sum(len(ids) + i for i in range(12))
            assert hops[1]["payload_up"] == hops[2]["payload_up"] == positions * 4 * 64
            assert hops[1]["bytes_down"] > 0 and hops[2]["bytes_down"] > 0
        assert ping(addrs[1])[0] == 0  # closed sessions are freed


@pytest.mark.slow
def test_driver_process_prints_json(tiny, shards, tmp_path: Path) -> None:
    with loopback_chain(tiny, STAGES, logs=tmp_path / "chain") as addrs, Launcher(tmp_path) as run:
        (d,) = run.start([driver_program(LocalHost("dev"), STAGES, addrs[1], tiny, "hello world", 6, "none",
                                         "fp16", True)])
        run.wait_exit([d], 120)
    res, _ = driver_result(d)
    assert d.returncode == 0 and d.cpu_ms is not None and d.cpu_ms >= 0  # clock ticks: 0 is a reading
    assert 1 <= len(res["tokens"]) <= 6 and isinstance(res["text"], str)
    assert res["per_hop"][1]["payload_up"] == (res["prompt_tokens"] + len(res["tokens"]) - 1) * 2 * 64


@pytest.mark.slow
def test_concurrent_sessions_on_one_chain(tiny, shards, tmp_path: Path) -> None:
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int, addr: str) -> None:
        try:
            client = SplitClient(shards[0], addr, kv_cache=True, layers=[s.layers for s in STAGES],
                                 timeout_s=60, ctx=zmq.Context.instance())
            try:
                results[i] = client.generate(torch.tensor([PROMPTS[i]]), 10, set())["tokens"]
            finally:
                client.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with loopback_chain(tiny, STAGES, logs=tmp_path) as addrs:
        threads = [threading.Thread(target=run, args=(i, addrs[1])) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = ping(addrs[2])
    assert not errors
    for i, ids in enumerate(PROMPTS):
        assert results[i] == reference(shards, ids, 10), f"session {i}"
    assert stats[2] >= sum(10 for _ in PROMPTS)  # requests served by the last node


@pytest.mark.slow
def test_idle_timeout_frees_sessions(tiny, shards, tmp_path: Path) -> None:
    with loopback_chain(tiny, STAGES, idle_timeout=1.0, logs=tmp_path) as addrs:
        client = SplitClient(shards[0], addrs[1], layers=[s.layers for s in STAGES], timeout_s=60)
        client.generate(torch.tensor([PROMPTS[0]]), 4, set())  # no CLOSE: the session stays
        n_sessions, cache_bytes, _, _ = ping(addrs[1])
        assert n_sessions == 1 and cache_bytes > 0
        deadline = time.monotonic() + 10
        while (ping(addrs[1])[0] or ping(addrs[2])[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ping(addrs[1])[:2] == [0, 0] and ping(addrs[2])[:2] == [0, 0]
        # the expired session cannot continue: the node says so (the client then re-prefills it)
        with pytest.raises(SessionEvicted, match="evicted"):
            client.step(4, torch.tensor([[3]]), 8, shards[0].new_cache())
        client.sock.close(0)
        client.sock = None


@pytest.mark.slow
def test_bad_requests_get_errors_and_the_chain_keeps_serving(tiny, shards, tmp_path: Path) -> None:
    with loopback_chain(tiny, STAGES, logs=tmp_path) as addrs:
        client = SplitClient(shards[0], addrs[1], layers=[s.layers for s in STAGES], timeout_s=60)
        with pytest.raises(SplitError, match="unknown session"):
            client.step(0, torch.tensor([[1, 2]]), 5, shards[0].new_cache())  # no session at pos 5
        bad = SplitClient(shards[0], addrs[1], codec="int8", layers=[s.layers for s in STAGES])
        bad.first = Shard.load(tiny, 0, 1)
        x = torch.randn(1, 2, 32)  # wrong hidden size
        bad.sock.send_multipart(hidden_message(bad.session, 0, 0, x, "fp16", True).frames())
        assert bad.sock.poll(5000)
        reply = parse(bad.sock.recv_multipart())
        assert reply.kind == Kind.ERROR and "hidden size" in reply.text()
        bad.close()
        got = client.generate(torch.tensor([PROMPTS[1]]), 5, set())["tokens"]
        client.close()
        assert got == reference(shards, PROMPTS[1], 5)


@pytest.mark.slow
def test_node_exits_cleanly_on_sigterm_and_refuses_wildcard_bind(tiny, tmp_path: Path) -> None:
    from testbed.apps.inference.local_chain import free_port

    wild = shard_program(LocalHost(), STAGES[2], "tcp://0.0.0.0:5999", None, tiny, "none")
    r = subprocess.run([sys.executable, str(REPO / "nodes" / "shard_node.py"), "--settings",
                        encode_settings(wild.settings)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stderr.strip() == (
        "shard_node settings: bind: must name one address of this host, not a wildcard (got 'tcp://0.0.0.0:5999')")
    addr = f"tcp://127.0.0.1:{free_port()}"
    with Launcher(tmp_path) as run:
        (node,) = run.start([shard_program(LocalHost("cloud"), STAGES[2], addr, None, tiny, "none")])
        run.wait_ready([node], 60)
        assert ping(addr)[0] == 0
    assert node.returncode == 0  # SIGTERM: a clean exit, within the grace period


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "bf16"])
def test_quantized_nodes_match_quantized_reference(tiny, quant: str, tmp_path: Path) -> None:
    qshards = [Shard.load(tiny, s.start, s.end, quant=quant) for s in STAGES]
    with loopback_chain(tiny, STAGES, quant=quant, logs=tmp_path) as addrs:
        client = SplitClient(qshards[0], addrs[1], codec="fp16", layers=[s.layers for s in STAGES])
        try:
            got = client.generate(torch.tensor([PROMPTS[0]]), 8, set())["tokens"]
        finally:
            client.close()
    assert got == reference(qshards, PROMPTS[0], 8, codec="fp16")
