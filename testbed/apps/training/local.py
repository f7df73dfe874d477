"""``--local``: the same training in one process, no network: the reference of every split run.

One stage holds the whole model; the batch is split into the same micro-batches, each one's loss
scaled by 1/M, and gradients accumulate in micro-batch order before one AdamW step, as the
pipeline does.  Same seed, same data, same adapter initialisation (``testbed.apps.training.lora``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from testbed.apps.training.batches import micro_batches
from testbed.apps.training.lora import LoraSpec
from testbed.apps.training.stage import TrainStage

SHIPPED_TEXT = Path(__file__).resolve().parents[2] / "model" / "data" / "eval_text.txt"
EVAL_TOKENS = 8192  # held-out tokens per client that the perplexity reads (a CPU-friendly bound)

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def client_data(model_dir: str | Path, data: list[str], clients: int, batch: int, seq: int):
    """Every client's training and held-out tokens (``testbed.apps.training.data``): ``data`` names
    files or built-in corpora; empty: the default corpora."""
    from testbed.apps.training.data import load_clients, parse_data
    from testbed.model.loading import load_tokenizer

    tok = load_tokenizer(Path(model_dir))
    return load_clients(parse_data(",".join(data) or None, clients), tok, clients, batch, seq)


def take_batches(train: torch.Tensor, steps: int, batch: int, seq: int, seed: int, stream: int = 0) -> Pairs:
    """The first ``steps`` seeded batches of ``train``: (inputs, targets) pairs."""
    from testbed.apps.training.data import Batches

    b = Batches(train, batch, seq, seed, stream)
    return [(t.inputs.contiguous(), t.targets.contiguous()) for t in (b.next() for _ in range(steps))]


def take_sample_ids(train: torch.Tensor, steps: int, batch: int, seq: int, seed: int, stream: int = 0
                    ) -> list[tuple[int, ...]]:
    """The sample ids of :func:`take_batches`'s batches, in the same order."""
    from testbed.apps.training.data import Batches

    b = Batches(train, batch, seq, seed, stream)
    return [b.next().sample_ids for _ in range(steps)]


def train_batches(model_dir: str | Path, data: list[str], steps: int, batch: int, seq: int, seed: int
                  ) -> Pairs:
    """The batches of a single client (the device of ``sl``)."""
    (cd,) = client_data(model_dir, data, 1, batch, seq)
    return take_batches(cd.train, steps, batch, seq, seed)


def held_out_ppl(model_dir: str | Path, n_layers: int, spec: LoraSpec,
                 adapters: dict[str, torch.Tensor] | None, heldout: dict[str, torch.Tensor], seq: int,
                 max_tokens: int = EVAL_TOKENS) -> dict:
    """Held-out perplexity of the base model (``adapters`` None) or with the adapters applied."""
    from testbed.apps.training.evaluate import evaluate_clients

    trainable = {int(n.split(".")[2]) for n in adapters} if adapters else set()
    stage = TrainStage(model_dir, 0, n_layers, spec, 0, trainable)
    with torch.no_grad():
        for name, p in stage.named_adapters:
            p.copy_((adapters or {})[name])
    capped = {k: v[:max_tokens] for k, v in heldout.items()}
    return evaluate_clients(stage._run, capped, seq)


def run_local(model_dir: str | Path, n_layers: int, batches: list[tuple[torch.Tensor, torch.Tensor]],
              spec: LoraSpec, lr: float, seed: int, micro: int, trainable: set[int] | None = None,
              checkpoint_dir: Path | None = None, checkpoint_every: int = 0, resume_step: int = 0
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train in this process; (result fields, adapter tensors by global name).  A checkpoint goes to
    ``checkpoint_dir`` every ``checkpoint_every`` steps; ``resume_step`` K > 0 starts from step K's."""
    from testbed.apps.training import checkpoint
    from testbed.apps.training.lora import flatten

    stage = TrainStage(model_dir, 0, n_layers, spec, seed, trainable)
    opt = torch.optim.AdamW(stage.adapters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    step_ms: list[float] = []
    if resume_step:
        assert checkpoint_dir is not None
        state = checkpoint.load(checkpoint_dir, "local", resume_step)
        checkpoint.load_adapters(stage.named_adapters, state["adapters"])
        opt.load_state_dict(state["opt"])
        losses, step_ms = list(state["losses"]), list(state["step_ms"])
    for step, (x, y) in enumerate(batches):
        if step < resume_step:  # the data cursor moves past the steps done before the checkpoint
            continue
        t0 = time.monotonic()
        loss = 0.0
        for xm, ym in zip(micro_batches(x, micro), micro_batches(y, micro), strict=True):
            p = stage.forward_micro(xm, ym, 1.0 / micro)
            loss += p.loss * (1.0 / micro)
            stage.backward_micro(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_ms.append((time.monotonic() - t0) * 1e3)
        losses.append(loss)
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            assert checkpoint_dir is not None
            checkpoint.save(checkpoint_dir, "local", step + 1, {
                "adapters": flatten(stage.named_adapters), "opt": opt.state_dict(), "losses": losses,
                "step_ms": step_ms})
    tokens = batches[0][0].numel() if batches else 0
    result = {
        "losses": losses,
        "step_ms": [round(v, 3) for v in step_ms],
        "step_ms_mean": round(statistics.fmean(step_ms), 3),
        "step_ms_p50": round(statistics.median(step_ms), 3),
        "tokens_per_s": round(tokens * len(step_ms) / (sum(step_ms) / 1e3), 3),
        "bytes_up": [0] * len(step_ms), "bytes_down": [0] * len(step_ms),
        "bytes_up_per_step": 0.0, "bytes_down_per_step": 0.0,
        "per_hop": [{"layers": f"0:{n_layers}", "peak_act_bytes": int(stage.meter.peak)}],
    }
    return result, {n: p.detach().clone() for n, p in stage.named_adapters}


def run_local_clients(model_dir: str | Path, n_layers: int, cut: int, batches: list[Pairs], spec: LoraSpec,
                      lr: float, seed: int, micro: int, trainable: set[int] | None = None,
                      aggregate_every: int = 0, turns: bool = False
                      ) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """Several clients in this process: one device model (layers ``0:cut``) per client, one server
    model (``cut:n_layers``); each step runs client 0's micro-batches, then client 1's, ... (the
    order of the split run's first server), every loss scaled by 1/(C M); every ``aggregate_every``
    steps the devices' adapters are replaced by their mean (FedAvg, equal weights).  Returns the
    result fields and, per client, its adapters and the server's by global name.

    ``turns`` (sl with several devices): step s is device ``s % C``'s alone, on its next batch
    (``batches[c]`` holds its turns' batches), starting from the adapters the previous device ended
    with; each device keeps its own AdamW state; losses scaled by 1/M."""
    from testbed.apps.training.aggregate import fedavg

    clients = len(batches)
    devs = [TrainStage(model_dir, 0, cut, spec, seed, trainable) for _ in range(clients)]
    server = TrainStage(model_dir, cut, n_layers, spec, seed, trainable)
    opts = [torch.optim.AdamW(st.adapters(), lr=lr, weight_decay=0.0) if st.adapters() else None
            for st in [*devs, server]]
    scale = 1.0 / (micro if turns else clients * micro)
    losses, step_ms = [], []
    steps = sum(len(b) for b in batches) if turns else len(batches[0])
    for step in range(steps):
        t0 = time.monotonic()
        loss = 0.0
        if turns:
            c = step % clients
            if step:
                from testbed.apps.training.lora import flatten

                _copy(devs[c], flatten(devs[(step - 1) % clients].named_adapters))
            work = [(devs[c], batches[c][step // clients])]
        else:
            work = [(dev, per_client[step]) for dev, per_client in zip(devs, batches, strict=True)]
        for dev, (x, y) in work:
            for xm, ym in zip(micro_batches(x, micro), micro_batches(y, micro), strict=True):
                pd = dev.forward_micro(xm)
                ps = server.forward_micro(pd.out, ym, scale)
                loss += ps.loss * scale
                dev.backward_micro(pd, server.backward_micro(ps))
        for opt in opts:
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        if aggregate_every and (step + 1) % aggregate_every == 0 and devs[0].named_adapters:
            from testbed.apps.training.lora import flatten

            mean = fedavg([{"flat": flatten(d.named_adapters)} for d in devs], [1.0] * clients)["flat"]
            for d in devs:
                _copy(d, mean)
        step_ms.append((time.monotonic() - t0) * 1e3)
        losses.append(loss)
    tokens = sum(b[0].numel() for per_client in batches for b, _ in per_client) if turns else \
        sum(per_client[0][0].numel() for per_client in batches) * steps
    result = {"losses": losses, "step_ms": [round(v, 3) for v in step_ms],
              "step_ms_mean": round(statistics.fmean(step_ms), 3),
              "step_ms_p50": round(statistics.median(step_ms), 3),
              "tokens_per_s": round(tokens / (sum(step_ms) / 1e3), 3),
              "bytes_up": [0] * steps, "bytes_down": [0] * steps, "bytes_up_per_step": 0.0,
              "bytes_down_per_step": 0.0,
              "per_hop": [{"layers": f"0:{cut}", "peak_act_bytes": max(d.meter.peak for d in devs)},
                          {"layers": f"{cut}:{n_layers}", "peak_act_bytes": server.meter.peak}]}
    srv = {n: p.detach().clone() for n, p in server.named_adapters}
    return result, [{**{n: p.detach().clone() for n, p in d.named_adapters}, **srv} for d in devs]


def _copy(stage: TrainStage, flat: torch.Tensor) -> None:
    """Set a stage's adapters from their flat concatenation (``lora.flatten``'s order)."""
    with torch.no_grad():
        i = 0
        for _, p in stage.named_adapters:
            p.copy_(flat[i:i + p.numel()].reshape(p.shape).to(p.dtype))
            i += p.numel()
