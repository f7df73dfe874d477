"""``security: curve``: per-run CurveZMQ keys, their files and settings, and shard nodes that answer
only the run's own programs (a rogue on the same loopback gets nothing and injects nothing)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from testbed.apps.inference.activations import hidden_message
from testbed.apps.inference.local_chain import free_port, loopback_chain
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import run_on_network
from testbed.apps.inference.settings import DriverSettings, ShardSettings
from testbed.apps.inference.split_client import SplitClient
from testbed.apps.launch import decode_settings, encode_settings
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.model.tiny import make_tiny_model_dir
from testbed.spec.commands import summary
from testbed.spec.errors import SpecError
from testbed.spec.topology import parse_topology
from testbed.wire import message as m
from testbed.wire import security
from testbed.wire.message import Kind, parse
from testbed.wire.security import CurveContext, CurveKeys, read_keys, write_run_keys

STAGES = [Stage("phone", 0, 1), Stage("mec", 1, 2)]
PROMPT = [5, 17, 33, 2, 9]
ROGUE_WAIT_MS = 1500


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=2, hidden=64)


class _LoopbackNet:
    """What ``run_on_network`` needs of a network: its topology, addresses (loopback), ``popen``."""

    def __init__(self, topo) -> None:
        self.topo = topo

    def ip(self, node: str, peer: str | None = None) -> str:
        return "127.0.0.1"

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, start_new_session=True, **kw)


def _topology(tmp_path: Path, **extra) -> object:
    data = {"nodes": {"phone": {"role": "device"}, "mec": {"role": "edge"}},
            "links": [{"between": ["phone", "mec"]}], **extra}
    return parse_topology(data, tmp_path / "t.yaml")


# ---- the spec field --------------------------------------------------------------------------------

def test_topology_security_field(tmp_path: Path) -> None:
    assert _topology(tmp_path).security == "none"  # off by default
    topo = _topology(tmp_path, security="curve")
    assert topo.security == "curve" and topo.to_dict()["security"] == "curve"
    assert summary(topo).endswith("tcp_cc cubic, security curve")  # testbed validate says so
    assert summary(_topology(tmp_path)).endswith("tcp_cc cubic")
    with pytest.raises(SpecError, match=r"t.yaml: security: must be one of none, curve \(got 'tls'\)"):
        _topology(tmp_path, security="tls")


# ---- keys and their files --------------------------------------------------------------------------

def test_key_files_are_private_and_minimal(tmp_path: Path) -> None:
    node, device = write_run_keys(tmp_path)
    for p in (node, device):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    nk, dk = read_keys(node), read_keys(device)
    assert dk.server_secret is None and nk.server_secret is not None  # a device cannot serve
    assert (dk.server_public, dk.client_public, dk.client_secret) == \
        (nk.server_public, nk.client_public, nk.client_secret)
    assert len({nk.server_public, nk.server_secret, nk.client_public, nk.client_secret}) == 4
    # every run has its own keys; a second run in the same folder replaces the files
    again, _ = write_run_keys(tmp_path)
    assert read_keys(again).server_public != nk.server_public
    # a file others can read is refused, in one line, and so is one that is not a keys file
    os.chmod(node, 0o644)
    with pytest.raises(SpecError, match=r"curve-node.json: file: .*readable by its owner only .*0644"):
        read_keys(node)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"server_public": "x"}))
    bad.chmod(0o600)
    with pytest.raises(SpecError, match=r"bad.json: file: must hold exactly"):
        read_keys(bad)


def test_settings_name_the_file_never_a_key(tmp_path: Path, tiny: Path) -> None:
    node, device = write_run_keys(tmp_path)
    s = ShardSettings(bind="tcp://127.0.0.1:5601", model=str(tiny), start=1, end=2, curve_keys=str(node))
    text = encode_settings(s)
    keys = read_keys(node)
    assert str(node) in text
    assert all(k.decode() not in text for k in (keys.server_secret, keys.client_secret, keys.server_public))
    assert decode_settings(ShardSettings, text) == s
    os.chmod(device, 0o640)
    bad = encode_settings(DriverSettings(model=str(tiny), start=0, end=1, next="tcp://10.0.0.2:5601",
                                         curve_keys=str(device)))
    with pytest.raises(SpecError, match=r"curve_keys: the keys file must be readable by its owner only"):
        decode_settings(DriverSettings, bad)
    with pytest.raises(SpecError, match=r"curve_keys: cannot read the keys file"):
        decode_settings(ShardSettings, encode_settings(
            ShardSettings(bind="tcp://127.0.0.1:5601", model=str(tiny), start=1, end=2,
                          curve_keys=str(tmp_path / "missing.json"))))


def test_run_key_files(tmp_path: Path) -> None:
    assert security.run_key_files("none", tmp_path) == (None, None)
    assert not list(tmp_path.iterdir())  # no keys for a plain run
    node, device = security.run_key_files("curve", tmp_path / "run")
    assert Path(node).name == security.NODE_FILE and Path(device).name == security.DEVICE_FILE


# ---- rogues against a live shard node ---------------------------------------------------------------

def _rogue_sockets(keys: CurveKeys) -> list[tuple[str, zmq.Context, zmq.Socket]]:
    """A plain socket, one with its own keys that knows the server's public key, one with a wrong
    server key: the ways a process without the run's keys can try."""
    own = CurveKeys.new()
    out = []
    for name, ctx in (("plain", zmq.Context()),
                      ("own keys", CurveContext(CurveKeys(keys.server_public, None, own.client_public,
                                                          own.client_secret))),
                      ("wrong server key", CurveContext(CurveKeys(own.server_public, None, keys.client_public,
                                                                  keys.client_secret)))):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out.append((name, ctx, sock))
    return out


def _well_formed(session: int) -> list[list]:
    """A PING, a FORWARD that would open a session, and a CLOSE: each answered by an open node."""
    x = torch.randn(1, 3, 64)
    return [m.control(Kind.PING).frames(), hidden_message(session, 0, 0, x, "fp32", True).frames(),
            m.control(Kind.CLOSE, session).frames()]


@pytest.mark.slow
def test_rogues_get_nothing_and_the_run_completes(tiny: Path, tmp_path: Path) -> None:
    node, device = write_run_keys(tmp_path / "keys")
    first = Shard.load(tiny, 0, 1)
    with loopback_chain(tiny, STAGES, logs=tmp_path, curve_keys=str(node)) as addrs:
        rogues = _rogue_sockets(read_keys(node))
        try:
            for _, _, sock in rogues:
                sock.connect(addrs[1])
                for frames in _well_formed(1234):
                    sock.send_multipart(frames)
            # the run's own client, through the same node, at the same time
            ctx = security.context(str(device))
            client = SplitClient(first, addrs[1], layers=[s.layers for s in STAGES], timeout_s=60, ctx=ctx)
            try:
                client.connect()
                got = client.generate(torch.tensor([PROMPT]), 6, stop_ids=set())
                # what the node counted: the client's session and steps only, no error answered
                client.sock.send_multipart(m.control(Kind.PING).frames())
                assert client.sock.poll(5000)
                sessions, _, served, errors = parse(client.sock.recv_multipart()).tensor().tolist()
            finally:
                client.close()
                ctx.term()
            ref = generate_split([first, Shard.load(tiny, 1, 2)], PROMPT, 6).tokens
            assert got["tokens"] == [int(t) for t in ref]
            assert (sessions, served, errors) == (1, 6, 0), "a rogue's message reached the node"
            for name, _, sock in rogues:
                assert not sock.poll(ROGUE_WAIT_MS), f"the {name} rogue got a reply"
        finally:
            for _, ctx, sock in rogues:
                sock.close(0)
                ctx.term()
        # the plain socket cannot be told apart from a broken peer: still nothing reached the node
        assert "Traceback" not in (tmp_path / "shard-mec.log").read_text()


@pytest.mark.slow
def test_curve_run_through_the_launcher(tiny: Path, tmp_path: Path) -> None:
    """A topology with ``security: curve``: the launcher writes the keys into the run's folder and the
    programs find them through their settings; a rogue polling the node all along gets nothing."""
    port = free_port()
    net = _LoopbackNet(_topology(tmp_path, security="curve"))
    stop, replies, sent = threading.Event(), [], [0]

    def rogue() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            while not stop.is_set():
                sock.send_multipart(m.control(Kind.PING).frames())
                sent[0] += 1
                if sock.poll(200):
                    replies.append(sock.recv_multipart())
        finally:
            sock.close(0)
            ctx.term()

    t = threading.Thread(target=rogue, daemon=True)
    t.start()
    try:
        res = run_on_network(net, STAGES, tiny, "", 5, "none", "fp32", True, prompt_ids=PROMPT,
                             ports=[0, port], logs=tmp_path / "run")
    finally:
        time.sleep(0.3)
        stop.set()
        t.join(10)
    ref = generate_split([Shard.load(tiny, 0, 1), Shard.load(tiny, 1, 2)], PROMPT, 5).tokens
    assert res["tokens"] == [int(x) for x in ref]
    assert sent[0] > 0 and not replies
    keys = read_keys(tmp_path / "run" / security.NODE_FILE)
    logs = "".join(p.read_text() for p in (tmp_path / "run").glob("*.log"))
    assert security.DEVICE_FILE in logs  # the settings name the file ...
    assert all(k.decode() not in logs for k in (keys.server_secret, keys.client_secret))  # ... not a key
