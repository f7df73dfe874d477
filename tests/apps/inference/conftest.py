"""What the inference drivers need from an EmulatedNetwork, on this machine's loopback."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.model.tiny import make_tiny_model_dir
from testbed.spec.topology import Topology


class LoopbackNet:
    """A topology (for the nodes' CPU limits), ``ip`` (always 127.0.0.1) and ``popen`` (a plain child,
    recorded per node so a test can kill one)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.procs: dict[str, list[subprocess.Popen]] = {}

    def ip(self, node: str, peer: str | None = None) -> str:
        return "127.0.0.1"

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.setdefault(node, []).append(p)
        return p

    def all_stopped(self) -> bool:
        return all(p.poll() is not None for ps in self.procs.values() for p in ps)


@pytest.fixture
def loopback_net() -> Callable[[Topology], LoopbackNet]:
    return LoopbackNet


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory) -> Path:
    """A 2-layer tiny model, hidden size 64."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=2, hidden=64)
