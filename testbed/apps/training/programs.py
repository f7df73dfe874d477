"""The two training node programs, as functions of their settings (``nodes/train_*.py`` call them).

- :func:`stage_node`: load layers ``start:end`` with adapters, serve them (forward, backward,
  optimizer) until stopped; prints its ready line once loaded and bound.
- :func:`client_node`: the device: its layers, the data, every step; prints its ready line once the
  next stage answered, then one JSON line with the measurements (or ``{"error": ...}``, exit 1).
"""

from __future__ import annotations

import json
import os
import signal

from testbed.apps.launch import announce_ready
from testbed.apps.training.settings import ClientSettings, StageSettings


def _spec(s: StageSettings | ClientSettings):
    from testbed.apps.training.lora import LoraSpec

    return LoraSpec(rank=s.rank, alpha=s.alpha, targets=tuple(s.targets))


def _trainable(s: StageSettings | ClientSettings) -> set[int] | None:
    return set(s.trainable) if s.trainable is not None else None


def stage_node(s: StageSettings) -> int:
    import torch

    from testbed.apps.training.server import StageServer
    from testbed.apps.training.stage import TrainStage

    torch.set_num_threads(s.threads)
    server = StageServer(TrainStage(s.model, s.start, s.end, _spec(s), s.seed, _trainable(s)), s)

    def stop(_sig: int, _frame: object) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    announce_ready(f"{s.bind} stage={s.stage} layers={s.start}:{s.end} threads={s.threads}")
    try:
        server.serve()
    finally:
        server.close()
    return 0


def client_node(s: ClientSettings) -> int:
    import torch

    from testbed.apps.training.client import TrainClient, TrainError, summarize
    from testbed.apps.training.local import client_data, take_batches, take_sample_ids
    from testbed.apps.training.lora import save_adapters
    from testbed.apps.training.stage import TrainStage

    torch.set_num_threads(s.threads)
    mine = client_data(s.model, s.data, s.clients, s.batch, s.seq)[s.client]
    turns = list(range(s.client, s.steps, s.clients)) if s.turns else list(range(s.steps))
    batches = take_batches(mine.train, len(turns), s.batch, s.seq, s.seed, stream=s.client)
    frozen = s.trainable is not None and not any(t < s.end for t in s.trainable)
    ids = take_sample_ids(mine.train, len(turns), s.batch, s.seq, s.seed, stream=s.client) if frozen \
        else [None] * len(turns)
    client = TrainClient(TrainStage(s.model, s.start, s.end, _spec(s), s.seed, _trainable(s)), s)
    try:
        try:
            client.connect()
            announce_ready(f"next={s.next} layers={s.start}:{s.end} threads={s.threads}")
            parent = os.getppid()
            if s.turns:  # until its first turn: the state it starts with (or resumed), then what it handed on
                client.checkpoint(s.resume_step + 1, next((t for t in turns if t >= s.resume_step), s.steps))
                if s.resume_step and (s.resume_step - 1) % s.clients == s.client:
                    client.hand_on_again(s.resume_step - 1)
            for step, (x, y), sample_ids in zip(turns, batches, ids, strict=True):
                if step < s.resume_step:  # done before the checkpoint: the data cursor moves past it
                    continue
                if os.getppid() != parent:
                    raise TrainError("the run's driver is gone")
                if s.turns and step > 0:
                    client.take_turn(step)
                client.train_step(step, x, y, sample_ids)
                if s.turns:
                    client.hand_on(step)
                client.checkpoint(step + 1, min(step + s.clients, s.steps) if s.turns else None)
            out = summarize(client, client.stats(), list(s.hops))
            hops = [tuple(int(v) for v in h.split(":")) for h in s.hops]
            tensors = client.pull_adapters(hops, _spec(s))
        except TrainError as e:
            print(json.dumps({"error": str(e)}), flush=True)
            return 1
        if s.adapter_dir:
            save_adapters(s.adapter_dir, tensors, _spec(s), s.model)
        out["adapter_dir"] = s.adapter_dir
        print(json.dumps(out), flush=True)
        return 0
    finally:
        client.close()
