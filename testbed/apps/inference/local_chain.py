"""Shard nodes as plain subprocesses on loopback (tests and benchmarks; no namespaces needed)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import node_env, shard_argv, stop_all, wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_chain(model_dir: Path, stages: list[Stage], idle_timeout: float = 60.0,
                   quant: str = "none", threads: int = 1) -> Iterator[list[str]]:
    """Start a shard node for every stage but the first; yields their addresses (index 0 is None)."""
    addrs: list = [None] + [f"tcp://127.0.0.1:{free_port()}" for _ in stages[1:]]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(len(stages) - 1, 0, -1):
            nxt = addrs[i + 1] if i + 1 < len(stages) else None
            argv = shard_argv(addrs[i], model_dir, stages[i], nxt, quant, threads, idle_timeout)
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, env=node_env(threads)))
        wait_ready([(s.node, p) for s, p in zip(reversed(stages[1:]), procs, strict=True)], timeout_s=120)
        yield addrs
        for p in procs:
            assert p.poll() is None, "a shard node died during the test"
    finally:
        stop_all(procs)
        for p in procs:
            assert p.returncode is not None
            if p.stdout:
                p.stdout.close()
