"""Shard nodes as plain subprocesses on loopback (tests and benchmarks; no namespaces needed)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import shard_programs
from testbed.apps.launch import Launcher, LocalHost, default_logs_dir

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_chain(model_dir: Path, stages: list[Stage], idle_timeout: float = 60.0, quant: str = "none",
                   threads: int | None = None, logs: Path | None = None,
                   curve_keys: str | None = None) -> Iterator[list[str]]:
    """Start a shard node for every stage but the first; yields their addresses (index 0 is None).

    The caller computes the first stage itself, so it counts as one more sharer of the cores in the
    thread plan; ``threads`` fixes the nodes' thread count instead.  A node that dies while the
    block runs is an error (``ProgramFailed``) when the block ends.  ``curve_keys``: the nodes' keys
    file (``testbed.wire.security``) for CurveZMQ.
    """
    addrs: list = [None] + [f"tcp://127.0.0.1:{free_port()}" for _ in stages[1:]]
    programs = shard_programs(stages, addrs, LocalHost, model_dir, quant, idle_timeout_s=idle_timeout,
                              threads=threads, curve_keys=curve_keys)
    with Launcher(logs or default_logs_dir("loopback"), sharers=len(stages)) as run:
        run.wait_ready(run.start(programs), READY_TIMEOUT_S)
        yield addrs
        run.check()
