"""Shared by the training benches: the model to train, one run of ``testbed train`` (in one process,
or with every stage a process on loopback), and the median (min..max) of repeated figures."""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from testbed.apps.training.run import TrainOptions, run_training


def model_dir(name: str, work: Path) -> Path:
    """``default``: SmolLM2-135M; ``tiny:N``: a random N-layer tiny LLaMA built from code (hidden 64)."""
    if name.startswith("tiny"):
        from testbed.model.tiny import make_tiny_model_dir

        layers = int(name.partition(":")[2] or 2)
        d = work / f"tiny-{layers}"
        if not (d / "config.json").exists():
            make_tiny_model_dir(d, n_layers=layers)
        return d
    from testbed.model.loading import prepare_model_dir

    return prepare_model_dir(None if name == "default" else name)


def train(model: Path, placement: str, opt: TrainOptions, mode: str) -> dict[str, Any]:
    """One run: ``mode`` is ``local`` (one process, no network) or ``loopback`` (a process per stage)."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        return run_training(None, placement, opt, model=model, local=mode == "local",
                            loopback=mode == "loopback", out=Path(tmp))


def options(**kw: Any) -> TrainOptions:
    return replace(TrainOptions(evaluate=False), **kw)


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    """Median (min..max)."""
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}..{fmt.format(max(xs))})"


def even_placement(layers: int, device_layers: int, hops: int) -> str:
    """The device holds ``device_layers``; the rest is split as evenly as it goes over ``hops`` stages
    (nodes named s1..sN: on loopback the names only label the hops)."""
    parts = [f"dev=0:{device_layers}"]
    rest = layers - device_layers
    start = device_layers
    for i in range(hops):
        end = start + rest // hops + (1 if i < rest % hops else 0)
        parts.append(f"s{i + 1}={start}:{end}")
        start = end
    return ",".join(parts)
