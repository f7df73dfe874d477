"""A split training run inside the test process: stage servers in threads over loopback TCP."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from testbed.apps.training.client import TrainClient, summarize
from testbed.apps.training.lora import LoraSpec
from testbed.apps.training.run import free_ports
from testbed.apps.training.server import StageServer
from testbed.apps.training.settings import ClientSettings, StageSettings
from testbed.apps.training.stage import TrainStage


def split_run(model: Path, cuts: list[int], n_layers: int,
              batches: list[tuple[torch.Tensor, torch.Tensor]], **kw) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train over a chain device -> stages cut at ``cuts``; (summary, adapters by global name)."""
    (out,) = split_run_clients(model, cuts, n_layers, [batches], **kw)
    return out


def split_run_clients(model: Path, cuts: list[int], n_layers: int,
                      batches: list[list[tuple[torch.Tensor, torch.Tensor]]], **kw
                      ) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """Every client (one list of batches each, in its own thread) trains over the same chain; per
    client (summary, its adapters and the servers' by global name)."""
    edges = [0, *cuts, n_layers]
    hops = list(zip(edges[:-1], edges[1:], strict=True))
    x0 = batches[0][0][0]
    common = dict(model=str(model), stages=len(hops), seed=kw.pop("seed", 0), timeout_s=60.0,
                  clients=len(batches), **kw)
    spec = LoraSpec()
    spec = LoraSpec(rank=common.get("rank", spec.rank), alpha=common.get("alpha", spec.alpha))
    trainable = set(common["trainable"]) if common.get("trainable") is not None else None
    ports = free_ports(len(hops))
    addr = [f"tcp://127.0.0.1:{p}" for p in ports]
    servers, threads = [], []
    results: dict[int, tuple[dict, dict[str, torch.Tensor]]] = {}
    errors: list[BaseException] = []

    turns = common.get("turns", False)
    total = sum(len(b) for b in batches) if turns else len(batches[0])

    def client_run(c: int) -> None:
        cs = ClientSettings(start=0, end=hops[0][1], next=addr[1], hops=[f"{a}:{b}" for a, b in hops],
                            steps=total, batch=x0.shape[0], seq=x0.shape[1], client=c, **common)
        client = TrainClient(TrainStage(model, 0, hops[0][1], spec, cs.seed, trainable), cs)
        mine = range(c, total, len(batches)) if turns else range(total)
        try:
            client.connect()
            for step, (x, y) in zip(mine, batches[c], strict=True):
                if turns and step > 0:
                    client.take_turn(step)
                client.train_step(step, x, y)
                if turns:
                    client.hand_on(step)
            summary = summarize(client, client.stats(), cs.hops)
            results[c] = summary, client.pull_adapters(hops, spec)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
        finally:
            client.close()

    try:
        for i in range(len(hops) - 1, 0, -1):
            s = StageSettings(start=hops[i][0], end=hops[i][1], stage=i, bind=addr[i],
                              next=addr[i + 1] if i + 1 < len(hops) else None, **common)
            srv = StageServer(TrainStage(model, s.start, s.end, spec, s.seed, trainable), s)
            servers.append(srv)
            threads.append(threading.Thread(target=srv.serve, daemon=True))
            threads[-1].start()
        runs = [threading.Thread(target=client_run, args=(c,)) for c in range(len(batches))]
        for t in runs:
            t.start()
        for t in runs:
            t.join(120)
        if errors:
            raise errors[0]
        return [results[c] for c in range(len(batches))]
    finally:
        for srv in servers:
            srv.running = False
        for t in threads:
            t.join(5)
        for srv in servers:
            srv.close()
