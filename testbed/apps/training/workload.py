"""One training point of an experiment suite: train over a network that is already up, return the record.

The experiment runner (``testbed.experiments.runner``) brings a point's topology up and hands the
network here, as it hands an inference point to ``testbed.apps.inference.sessions``.  The record is
``testbed train --json``'s object (losses, step times, bytes, per-hop figures, the analytic
prediction, held-out perplexity) plus the running sums the reports draw against: wall-clock and
bytes after each step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.apps.training.run import (
    TrainOptions,
    adapter_bytes,
    evaluation,
    model_layers,
    predict_step_ms,
    run_on_network,
)
from testbed.spec.topology import Topology


@dataclass(frozen=True)
class TrainPoint:
    """What a suite point asks of a training run (the suite's parameter names)."""

    placement: str  # resolved, the first node a device: "phone=0:4,mec=4:30"
    clients: list[str]  # the devices; several: the first replaces the placement's first node on each
    steps: int = 4
    batch: int = 4
    seq: int = 64
    scheme: str = "sl"
    schedule: str = "gpipe"
    micro_batches: int = 1
    codec: str = "fp32"
    grad_codec: str = "fp32"
    freeze_client: float = 0.0
    freeze_server: float = 0.0
    data: list[str] = field(default_factory=list)
    head_on_device: bool = False  # U-shaped: the device also holds the final norm, head and loss
    evaluate: bool = True  # held-out perplexity before and after

    def options(self) -> TrainOptions:
        return TrainOptions(steps=self.steps, batch=self.batch, seq=self.seq, scheme=self.scheme,
                            schedule=self.schedule, micro_batches=self.micro_batches, codec=self.codec,
                            grad_codec=self.grad_codec, freeze_client=self.freeze_client,
                            freeze_server=self.freeze_server, data=list(self.data),
                            clients=list(self.clients) if len(self.clients) > 1 else [],
                            head_on_device=self.head_on_device, evaluate=self.evaluate)


def check_texts(model_dir: Path, data: list[str], devices: int, batch: int, seq: int) -> None:
    """Tokenize the texts of ``devices`` devices as a run would: a SpecError (``testbed.apps.training.data``)
    for a text too short for one batch of ``batch`` x ``seq + 1`` tokens, or too few built-in corpora."""
    from testbed.apps.training.local import client_data

    client_data(model_dir, data, devices, batch, seq)


def train_point(net, topo: Topology, point: TrainPoint, model_dir: Path, out: Path,
                logs: Path) -> dict[str, Any]:
    """Train ``point`` over ``net`` (an EmulatedNetwork that is up); the run's record.

    Adapters go to ``out/adapters``; the node programs' logs to ``logs``."""
    from testbed.apps.training.placement import parse_placement

    n_layers = model_layers(model_dir)
    opt = point.options()
    first, _, rest = point.placement.partition(",")
    layers = first.partition("=")[2]
    placement = f"{point.clients[0]}={layers}" + (f",{rest}" if rest else "")
    stages = parse_placement(placement, topo, n_layers)
    for node in point.clients[1:]:  # every device must reach the first stage server
        parse_placement(",".join([f"{node}={layers}", rest]), topo, n_layers)
    adapter_dir = out / "adapters"
    result = run_on_network(net, stages, model_dir, opt, adapter_dir, logs)
    for hop, st in zip(result["per_hop"], stages, strict=True):
        hop["node"] = st.node
    steps_up = [u + d for u, d in zip(result["bytes_up"], result["bytes_down"], strict=True)]
    result.update(
        scheme=opt.scheme, schedule=opt.schedule, micro_batches=opt.micro_batches,
        clients=list(point.clients), hops=len(stages) - 1, placement=placement, adapter_dir=str(adapter_dir),
        head_on_device=opt.head_on_device,
        trainable_layers=opt.trainable(stages[0].end, n_layers),
        predicted_step_ms=predict_step_ms(result["per_hop"], stages, opt, topo, adapter_bytes(result),
                                          result.get("per_client")),
        wall_ms=[round(x, 3) for x in itertools.accumulate(result["step_ms"])],
        bytes_total=list(itertools.accumulate(steps_up)),
        **evaluation(model_dir, n_layers, opt, adapter_dir, result, base_cache(model_dir)),
    )
    return result


_BASE_PPL: dict[tuple[str, int], dict] = {}


def base_cache(model_dir: Path) -> dict:
    """The base model's held-out perplexities already computed in this process, by text: every point
    of a suite evaluates the same base model on the same texts (a minute of SmolLM2 on a loaded CPU
    each time).  Keyed by the model's folder and its weights' change time (a model rebuilt in place)."""
    weights = sorted(Path(model_dir).glob("*.safetensors")) or [Path(model_dir) / "config.json"]
    return _BASE_PPL.setdefault((str(model_dir), max(w.stat().st_mtime_ns for w in weights)), {})


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures a suite's record keeps at its top (``metrics``) for tables and plots."""
    keys = ("step_ms_mean", "step_ms_p50", "tokens_per_s", "bytes_up_per_step", "bytes_down_per_step",
            "predicted_step_ms", "eval_ppl_before", "eval_ppl_after", "hops", "placement", "head_on_device")
    m = {k: result.get(k) for k in keys}
    losses = result["losses"]
    m.update(loss_first=losses[0], loss_last=losses[-1], steps=len(losses),
             wall_ms=result["wall_ms"][-1] if result["wall_ms"] else 0.0,
             bytes_total=result["bytes_total"][-1] if result["bytes_total"] else 0,
             peak_act_bytes=[h.get("peak_act_bytes") for h in result["per_hop"]])
    pred = m["predicted_step_ms"]
    m["ratio"] = {"step": round(m["step_ms_mean"] / pred, 3) if pred else None}
    return m
