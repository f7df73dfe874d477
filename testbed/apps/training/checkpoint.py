"""Checkpoints of a training run: each program's adapters, AdamW state and place in the data.

Every program of a run (the device ``client{c}``, the stage servers ``stage{i}``) writes its own
file ``NAME.step{K}.safetensors`` after step K when K is a multiple of ``--checkpoint-every``.  A file is
written to a temporary name, flushed to disk and renamed over, so a SIGKILL leaves either the whole
file or none.  The programs reach step K at slightly different times, so each keeps its last
:data:`KEEP` files and ``--resume`` restarts every program from the latest step that all of them
saved (:func:`common_step`).  The data cursor is the step count: the batches are drawn from the seed,
so a resumed device skips the first K of them.

Devices taking turns (``sl`` with C > 1 devices: step s is device ``s % C``'s): a device's state does
not change between its turns, so after each turn (and at its start) a device writes the checkpoints
of every due step up to its next turn at once; the steps of the others' turns are thus covered when
they come, and it keeps :func:`keep_for_turns` files (its newest run up to C steps ahead of the
servers').  The adapters handed on at the checkpoint's step are the saved adapters of the device
whose turn it was: after ``--resume`` that device hands them on again (``TrainClient.hand_on_again``).

A file is safetensors: the tensors by a path of keys, and the rest of the state (numbers, lists,
strings; mappings with any keys, the optimizer's are integers) as typed JSON in its metadata.
Nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from testbed.files import write_atomic

KEEP = 3  # files per program: the programs lag each other by at most one step
_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\.step(?P<step>\d+)\.safetensors$")
OPTIONS = "options.json"


def path(folder: str | Path, name: str, step: int) -> Path:
    return Path(folder) / f"{name}.step{step:07d}.safetensors"


def keep_for_turns(clients: int, every: int) -> int:
    """Files a device taking turns keeps: KEEP, and its write-ahead until its next turn."""
    return KEEP + -(-clients // max(1, every))


def save(folder: str | Path, name: str, step: int, state: dict[str, Any], keep: int = KEEP) -> Path:
    """Write program ``name``'s state after ``step`` steps; drop its files older than the last ``keep``."""
    from safetensors.torch import save as save_tensors

    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_encode({**state, "step": step}, tensors))
    target = path(folder, name, step)
    write_atomic(target, save_tensors(tensors, metadata={"state": meta}))
    old = sorted(s for s in saved_steps(folder).get(name, []) if s < step)
    for s in old[:max(0, len(old) - (keep - 1))]:
        path(folder, name, s).unlink(missing_ok=True)
    return target


def load(folder: str | Path, name: str, step: int) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path(folder, name, step)), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
        state = _decode(json.loads(f.metadata()["state"]), tensors)
    if state.get("step") != step:
        raise ValueError(f"{path(folder, name, step)} holds step {state.get('step')}")
    return state


def _encode(value: Any, tensors: dict[str, torch.Tensor], key: str = "s") -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` (named by their path of keys)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors, f"{key}.k{i}"), _encode(v, tensors, f"{key}.{i}")]
                         for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, list | tuple):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"a checkpoint cannot hold {type(value).__name__} (at {key})")


def _decode(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    (tag, body), = node.items()
    if tag == "tensor":
        return tensors[body]
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if tag in ("list", "tuple"):
        items = [_decode(v, tensors) for v in body]
        return tuple(items) if tag == "tuple" else items
    if tag == "value":
        return body
    raise ValueError(f"unknown checkpoint entry {tag!r}")


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
    """Set adapters from their flat copy (``lora.flatten``'s order); exact for fp32 weights."""
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
