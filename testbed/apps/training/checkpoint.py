"""Checkpoints of a training run: each program's adapters, AdamW state and place in the data.

Every program of a run (the device ``client{c}``, the stage servers ``stage{i}``) writes its own
file ``NAME.step{K}.pt`` after step K when K is a multiple of ``--checkpoint-every``.  A file is
written to a temporary name, flushed to disk and renamed over, so a SIGKILL leaves either the whole
file or none.  The programs reach step K at slightly different times, so each keeps its last
:data:`KEEP` files and ``--resume`` restarts every program from the latest step that all of them
saved (:func:`common_step`).  The data cursor is the step count: the batches are drawn from the seed,
so a resumed device skips the first K of them.

Files hold tensors, numbers and lists only and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

KEEP = 3  # files per program: the programs lag each other by at most one step
_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\.step(?P<step>\d+)\.pt$")
OPTIONS = "options.json"


def path(folder: str | Path, name: str, step: int) -> Path:
    return Path(folder) / f"{name}.step{step:07d}.pt"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes) -> None:
    """``data`` at ``target``, whole or not at all: a temporary file, fsync, rename, fsync of the folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def save(folder: str | Path, name: str, step: int, state: dict[str, Any]) -> Path:
    """Write program ``name``'s state after ``step`` steps; drop its files older than the last KEEP."""
    import io

    buf = io.BytesIO()
    torch.save({**state, "step": step}, buf)
    target = path(folder, name, step)
    write_atomic(target, buf.getvalue())
    old = sorted(s for s in saved_steps(folder).get(name, []) if s < step)
    for s in old[:max(0, len(old) - (KEEP - 1))]:
        path(folder, name, s).unlink(missing_ok=True)
    return target


def load(folder: str | Path, name: str, step: int) -> dict[str, Any]:
    state = torch.load(path(folder, name, step), weights_only=True)
    if state.get("step") != step:
        raise ValueError(f"{path(folder, name, step)} holds step {state.get('step')}")
    return state


def saved_steps(folder: str | Path) -> dict[str, list[int]]:
    """The steps saved per program name."""
    out: dict[str, list[int]] = {}
    d = Path(folder)
    for f in d.iterdir() if d.is_dir() else []:
        m = _FILE.match(f.name)
        if m:
            out.setdefault(m["name"], []).append(int(m["step"]))
    return {k: sorted(v) for k, v in out.items()}


def common_step(folder: str | Path, names: list[str]) -> int:
    """The latest step every program in ``names`` saved (0: none, start from scratch)."""
    steps = saved_steps(folder)
    common = set.intersection(*(set(steps.get(n, [])) for n in names)) if names else set()
    return max(common, default=0)


def write_options(folder: str | Path, options: dict[str, Any]) -> None:
    write_atomic(Path(folder) / OPTIONS, json.dumps(options, sort_keys=True).encode())


def read_options(folder: str | Path) -> dict[str, Any] | None:
    f = Path(folder) / OPTIONS
    return json.loads(f.read_text()) if f.is_file() else None


def load_adapters(named: list[tuple[str, torch.Tensor]], flat: torch.Tensor) -> None:
    """Set adapters from their flat float64 copy (``lora.flatten``'s order); exact for fp32 weights."""
    with torch.no_grad():
        i = 0
        for _, p in named:
            p.copy_(flat[i:i + p.numel()].reshape(p.shape).to(p.dtype))
            i += p.numel()
    if i != flat.numel():
        raise ValueError(f"the checkpoint has {flat.numel()} adapter values, the stage {i}")


def restore(program: Any, step: int) -> dict[str, Any]:
    """Set a training program's adapters, optimizer and statistics rows from its checkpoint of
    ``step`` (``program``: a device or a stage server: ``s.checkpoint_dir``, ``name``, ``stage``,
    ``opt``, ``rows``); the whole saved state is returned for what only that program keeps."""
    if program.s.checkpoint_dir is None:
        raise ValueError(f"{program.name}: resuming needs a checkpoint folder")
    state = load(program.s.checkpoint_dir, program.name, step)
    load_adapters(program.stage.named_adapters, state["adapters"])
    if program.opt is not None:
        program.opt.load_state_dict(state["opt"])
    program.rows = [r.numpy().copy() for r in state["rows"]]
    return state
