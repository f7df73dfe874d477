"""What a model the user names must hold, checked before anything starts (network, nodes, a suite).

A model is a checkpoint folder (``config.json``, the weights ``model.safetensors`` and the tokenizer
``tokenizer.json``) or a ``.gguf`` file that is converted into one.  A folder that lacks a file would
otherwise be found out only when the first shard loads, after the network is up.
"""

from __future__ import annotations

import os
from pathlib import Path

from testbed.spec.errors import SpecError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
CHECKPOINT_FILES = (CONFIG, WEIGHTS, TOKENIZER)


class ModelFileError(SpecError, FileNotFoundError):
    """A model path that is not a usable checkpoint (a FileNotFoundError too, for older callers)."""


def missing_files(folder: Path) -> list[str]:
    """The checkpoint files that ``folder`` lacks."""
    return [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]


def check_model_path(path: str | Path, source: str | Path | None = None, field: str = "model") -> Path:
    """``path`` if it is a complete checkpoint folder or an existing ``.gguf`` file, else a ModelFileError.

    The error names ``source`` (the file or flag that named the model; default: the path itself).
    """
    p = Path(os.path.expanduser(path))  # ~nosuchuser stays as written (Path.expanduser raises)
    where, what = (p, "") if source is None else (source, f"{p}: ")
    if p.is_dir():
        missing = missing_files(p)
        if missing:
            raise ModelFileError(where, field, f"{what}not a checkpoint folder: no {', '.join(missing)} "
                                               f"(a checkpoint holds {', '.join(CHECKPOINT_FILES)})")
        return p
    if p.suffix == ".gguf" and p.is_file():
        return p
    if not p.exists():
        raise ModelFileError(where, field, f"{what}no such checkpoint folder or .gguf file")
    raise ModelFileError(where, field, f"{what}neither a checkpoint folder nor a .gguf file")
