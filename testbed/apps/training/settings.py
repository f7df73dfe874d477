"""Typed settings of the training node programs (``nodes/train_stage.py``, ``nodes/train_client.py``).

The launcher sends them as JSON and :func:`testbed.apps.launch.decode_settings` checks the types;
``problems()`` names values out of range.  Both programs share the run's training fields
(:class:`TrainFields`): model, adapters, optimizer, micro-batching, schedule, codecs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testbed.apps.training import defaults
from testbed.apps.training.schedule import SCHEDULES
from testbed.spec.options import CODECS

MAX_THREADS = 1024
MAX_TIMEOUT_S = 7 * 86400.0
MAX_STEPS = 1_000_000
MAX_MICRO = 4096
_ADDR = re.compile(r"^tcp://[0-9A-Za-z.\-\[\]:]+:(\d{1,5})$")
_LAYERS = re.compile(r"^(\d+):(\d+)$")
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _address(value: str | None, name: str) -> Iterator[tuple[str, str]]:
    if value is None:
        return
    m = _ADDR.match(value)
    if not m or not 0 < int(m.group(1)) < 65536:
        yield name, "must be tcp://HOST:PORT with a port in 1..65535"


@dataclass(frozen=True)
class TrainFields:
    """What every program of one training run agrees on."""

    model: str
    start: int
    end: int
    next: str | None = None  # the next stage downstream; None on the last stage
    stage: int = 0  # this program's place in the chain (the device is 0)
    stages: int = 2  # programs in the chain, the device included
    micro_batches: int = 1
    schedule: str = "gpipe"
    codec: str = "fp32"  # activations, downstream
    grad_codec: str = "fp32"  # activation gradients, upstream
    rank: int = defaults.RANK
    alpha: float = float(defaults.ALPHA)
    targets: list[str] = field(default_factory=lambda: list(defaults.TARGET_MODULES))
    trainable: list[int] | None = None  # global layer indices with adapters (None: all of start:end)
    lr: float = defaults.LR
    seed: int = defaults.SEED
    clients: int = 1  # devices training at once (the first stage server faces them all)
    aggregate_every: int = 0  # FedAvg of the devices' adapters every K steps at the first server; 0: never
    turns: bool = False  # sl with several devices: step s is device s % clients's, adapters handed on
    threads: int = 1  # set by the launcher from its thread plan
    timeout_s: float = 600.0  # for any one message this program waits for
    checkpoint_dir: str | None = None  # this program's checkpoints (testbed.apps.training.checkpoint)
    checkpoint_every: int = 0  # a checkpoint after every K steps; 0: none
    resume_step: int = 0  # start after this many steps, from their checkpoint (0: from scratch)
    drop_after_s: float = 0.0  # sfl/psl: a device this late in a round is left out of it and after; 0: never
    head_on_device: bool = False  # U-shaped: the device holds the final norm, head and loss (and labels)

    @property
    def pipeline_stages(self) -> int:
        """Stages of the schedule: U-shaped, the device's head is one more, after the last server."""
        return self.stages + 1 if self.head_on_device else self.stages

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from _address(self.next, "next")
        if self.start < 0:
            yield "start", "must be >= 0"
        if self.end <= self.start:
            yield "end", f"must be greater than start ({self.start})"
        if not 0 <= self.stage < self.stages:
            yield "stage", f"must be in 0..{self.stages - 1}"
        if not 1 <= self.micro_batches <= MAX_MICRO:
            yield "micro_batches", f"must be in 1..{MAX_MICRO}"
        if self.schedule not in SCHEDULES:
            yield "schedule", f"must be one of {', '.join(SCHEDULES)}"
        for name in ("codec", "grad_codec"):
            if getattr(self, name) not in CODECS:
                yield name, f"must be one of {', '.join(CODECS)}"
        if not 1 <= self.rank <= 4096:
            yield "rank", "must be in 1..4096"
        if not self.alpha > 0:
            yield "alpha", "must be > 0"
        if not self.targets or any(not _TARGET.match(t) for t in self.targets):
            yield "targets", "must be a non-empty list of module names (q_proj, v_proj, ...)"
        if not 1 <= self.clients <= 256:
            yield "clients", "must be in 1..256"
        if not 0 <= self.aggregate_every <= MAX_STEPS:
            yield "aggregate_every", f"must be in 0..{MAX_STEPS}"
        if not 0 < self.lr < 1:
            yield "lr", "must be in (0, 1)"
        if not 1 <= self.threads <= MAX_THREADS:
            yield "threads", f"must be in 1..{MAX_THREADS}"
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            yield "timeout_s", f"must be in (0, {MAX_TIMEOUT_S:.0f}]"
        if not 0 <= self.drop_after_s <= MAX_TIMEOUT_S:
            yield "drop_after_s", f"must be in 0..{MAX_TIMEOUT_S:.0f}"
        if self.head_on_device and self.drop_after_s:
            yield "drop_after_s", "goes without head_on_device (a left-out device holds the loss)"
        if not 0 <= self.checkpoint_every <= MAX_STEPS:
            yield "checkpoint_every", f"must be in 0..{MAX_STEPS}"
        if not 0 <= self.resume_step <= MAX_STEPS:
            yield "resume_step", f"must be in 0..{MAX_STEPS}"
        if (self.checkpoint_every or self.resume_step) and not self.checkpoint_dir:
            yield "checkpoint_dir", "is required for checkpoints and resuming"
        if not (Path(self.model) / "config.json").is_file():
            yield "model", "must be a model folder with a config.json"


@dataclass(frozen=True)
class StageSettings(TrainFields):
    """A stage server: layers ``start:end`` served on ``bind``; the last stage holds the head and loss."""

    bind: str = ""
    also_bind: list[str] = field(default_factory=list)  # more addresses (devices on other links)

    def problems(self) -> Iterator[tuple[str, str]]:
        for name, addr in [("bind", self.bind), *(("also_bind", a) for a in self.also_bind)]:
            if not _ADDR.match(addr) or "0.0.0.0" in addr or "*" in addr:
                yield name, "must be tcp://IP:PORT of this host"
        if self.stage < 1:
            yield "stage", "a stage server is stage 1 or later (the device is 0)"
        yield from super().problems()


@dataclass(frozen=True)
class ClientSettings(TrainFields):
    """The device: layers ``start:end`` with the embeddings, the data, the steps; reports one JSON line."""

    client: int = 0  # this device's index among the clients
    hops: list[str] = field(default_factory=list)  # "S:E" of every stage, the device's first
    steps: int = defaults.STEPS
    batch: int = defaults.BATCH
    seq: int = defaults.SEQ
    data: list[str] = field(default_factory=list)  # text files (empty: the shipped text)
    adapter_dir: str | None = None  # where the trained adapters are saved (peft's format)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.stage != 0 or self.start != 0:
            yield "stage", "the device is stage 0 and starts at layer 0"
        if self.next is None:
            yield "next", "is required (the device's layers are not the whole model)"
        if not 0 <= self.client < self.clients:
            yield "client", f"must be in 0..{self.clients - 1}"
        if not 1 <= self.steps <= MAX_STEPS:
            yield "steps", f"must be in 1..{MAX_STEPS}"
        if not 1 <= self.batch <= 4096:
            yield "batch", "must be in 1..4096"
        if not 1 <= self.seq <= 1 << 16:
            yield "seq", "must be in 1..65536"
        if self.batch % self.micro_batches:
            yield "micro_batches", f"must divide the batch ({self.batch})"
        if len(self.hops) != self.stages or any(not _LAYERS.match(h) for h in self.hops):
            yield "hops", f"must be {self.stages} entries START:END"
        yield from super().problems()
