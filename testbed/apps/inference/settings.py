"""Typed settings of the inference node programs (``nodes/shard_node.py``, ``nodes/driver.py``).

The launcher sends them as JSON; :func:`testbed.apps.launch.decode_settings` checks the types and
then ``problems()`` below names values out of range, so a program never starts on a bad one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testbed.model.adapter import folder_problem
from testbed.spec.options import CODECS, QUANTS
from testbed.wire.security import key_file_problem

MAX_THREADS = 1024
MAX_TOKENS = 100_000
MAX_TIMEOUT_S = 7 * 86400.0
_ADDR = re.compile(r"^tcp://[0-9A-Za-z.\-\[\]:]+:(\d{1,5})$")
_LAYERS = re.compile(r"^(\d+):(\d+)$")


def _address(value: str | None, name: str, wildcard_ok: bool = True) -> Iterator[tuple[str, str]]:
    if value is None:
        return
    m = _ADDR.match(value)
    if not m or not 0 < int(m.group(1)) < 65536:
        yield name, "must be tcp://HOST:PORT with a port in 1..65535"
    elif not wildcard_ok and ("0.0.0.0" in value or "*" in value):
        yield name, "must name one address of this host, not a wildcard"


def _model(path: str) -> Iterator[tuple[str, str]]:
    if not (Path(path) / "config.json").is_file():
        yield "model", "must be a model folder with a config.json"


def _common(s: ShardSettings | DriverSettings) -> Iterator[tuple[str, str]]:
    if s.quant not in QUANTS:
        yield "quant", f"must be one of {', '.join(QUANTS)}"
    if not 1 <= s.threads <= MAX_THREADS:
        yield "threads", f"must be in 1..{MAX_THREADS}"
    if s.start < 0:
        yield "start", "must be >= 0"
    if (problem := key_file_problem(s.curve_keys)) is not None:
        yield "curve_keys", problem
    if s.adapter is not None and (problem := folder_problem(s.adapter)) is not None:
        yield "adapter", problem


@dataclass(frozen=True)
class ShardSettings:
    """One shard node: layers ``start:end`` served on ``bind``, relayed to ``next`` unless it is last."""

    bind: str
    model: str
    start: int
    end: int
    next: str | None = None
    quant: str = "none"
    threads: int = 1  # set by the launcher from its thread plan
    idle_timeout_s: float = 60.0
    curve_keys: str | None = None  # the run's keys file (``security: curve``; testbed.wire.security)
    next_standbys: list[str] = field(default_factory=list)  # the next stage's standbys, seen from here
    kv_budget_mb: int | None = None  # the sessions' KV caches together (LRU eviction beyond it)
    kv_int8: bool = False  # int8 KV caches with per-head scales
    warmup: bool = False  # run one forward pass before the ready line (a standby takes over warm)
    adapter: str | None = None  # a peft LoRA folder: its LoRA of layers start:end merged in at load

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from _address(self.bind, "bind", wildcard_ok=False)
        yield from _address(self.next, "next")
        for addr in self.next_standbys:
            yield from _address(addr, "next_standbys")
        if self.next_standbys and self.next is None:
            yield "next_standbys", "need a next hop"
        if self.kv_budget_mb is not None and not 1 <= self.kv_budget_mb <= 1 << 30:
            yield "kv_budget_mb", "must be a positive number of MiB"
        yield from _common(self)
        if self.end <= self.start:
            yield "end", f"must be greater than start ({self.start})"
        if not 0 < self.idle_timeout_s <= MAX_TIMEOUT_S:
            yield "idle_timeout_s", f"must be in (0, {MAX_TIMEOUT_S:.0f}]"
        yield from _model(self.model)


@dataclass(frozen=True)
class DriverSettings:
    """The device program: its own layers ``start:end`` (``0:0``: none), the prompt, the session."""

    model: str
    start: int
    end: int
    next: str | None = None
    hops: list[str] = field(default_factory=list)  # "S:E" of every hop, the device's first (reports)
    prompt: str = ""
    prompt_ids: list[int] | None = None  # token ids sent as they are (no chat template)
    max_new_tokens: int = 32
    codec: str = "fp32"
    quant: str = "none"
    kv_cache: bool = True
    stop_at_eos: bool = True
    threads: int = 1  # set by the launcher from its thread plan
    timeout_s: float = 300.0  # for each reply of the next hop
    curve_keys: str | None = None  # the run's keys file (``security: curve``; testbed.wire.security)
    next_standbys: list[str] = field(default_factory=list)  # the next stage's standbys
    routes: list[list[str]] = field(default_factory=list)  # every stage's nodes, primary first (records)
    detect_floor_ms: float = 50.0  # the smallest step deadline before a stage counts as failed
    adapter: str | None = None  # a peft LoRA folder: its LoRA of layers start:end merged in at load

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from _address(self.next, "next")
        for addr in self.next_standbys:
            yield from _address(addr, "next_standbys")
        if self.next_standbys and self.next is None:
            yield "next_standbys", "need a next hop"
        if self.routes and (len(self.routes) != len(self.hops) or not all(self.routes)):
            yield "routes", "must list the nodes of every hop"
        if not 0 < self.detect_floor_ms <= 1e6:
            yield "detect_floor_ms", "must be in (0, 1e6]"
        yield from _common(self)
        if self.end < self.start:
            yield "end", f"must be >= start ({self.start})"
        if self.codec not in CODECS:
            yield "codec", f"must be one of {', '.join(CODECS)}"
        if not 1 <= self.max_new_tokens <= MAX_TOKENS:
            yield "max_new_tokens", f"must be in 1..{MAX_TOKENS}"
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            yield "timeout_s", f"must be in (0, {MAX_TIMEOUT_S:.0f}]"
        if any(not _LAYERS.match(h) for h in self.hops):
            yield "hops", "must be a list of START:END"
        if self.prompt_ids is not None and (not self.prompt_ids or min(self.prompt_ids) < 0):
            yield "prompt_ids", "must be a non-empty list of token ids >= 0"
        if self.next is None and self.end == self.start:
            yield "next", "is required when the device holds no layer"
        yield from _model(self.model)
