"""The block node program started by the launcher serves a catalogue's blocks to an edge store; bad
settings are one line and exit code 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from testbed.apps.caching.delivery import BlockFetcher
from testbed.apps.caching.settings import BlockNodeSettings
from testbed.apps.caching.store import EdgeStore
from testbed.apps.launch import NODES, Launcher, LocalHost, Program

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_repository_node_serves_a_model_to_an_edge_store(tiny_catalogue, tmp_path: Path):
    cat = tiny_catalogue
    model = next(m for m in cat.models.values() if m.kind == "lora" and m.base == "tiny")
    store = EdgeStore(tmp_path / "edge", capacity_bytes=2 * model.bytes)
    bind = f"tcp://127.0.0.1:{free_port()}"
    with Launcher(tmp_path / "logs") as run:
        settings = BlockNodeSettings(bind, str(cat.root / "blocks"))
        (repo,) = run.start([Program("repo", "block_node.py", settings, LocalHost("cloud"), compute=False)])
        run.wait_ready([repo], timeout_s=60)
        with BlockFetcher(bind, store.put, chunk_bytes=4096) as f:
            rep = f.fetch(model.hashes())
    assert store.blocks() == set(model.hashes()) and rep.bytes == model.bytes == store.used_bytes
    counters = json.loads([ln for ln in repo.log.read_text().splitlines() if ln.startswith("{")][-1])
    assert counters["meta_sent"] == len(model.hashes()) and counters["chunks_sent"] == rep.chunks
    assert counters["chunk_bytes_sent"] == model.bytes


def test_bad_settings_are_one_line_exit_2(tmp_path: Path):
    bad = json.dumps({"bind": "tcp://127.0.0.1", "blocks": str(tmp_path)})
    r = subprocess.run([sys.executable, str(NODES / "block_node.py"), "--settings", bad],
                       capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("block_node settings: bind: must be tcp://HOST:PORT with a port in 1..65535 "
                                "(got 'tcp://127.0.0.1')")
