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

from testbed.apps.training.batches import draw_batches, micro_batches
from testbed.apps.training.lora import LoraSpec
from testbed.apps.training.stage import TrainStage

SHIPPED_TEXT = Path(__file__).resolve().parents[2] / "model" / "data" / "eval_text.txt"


def load_ids(model_dir: str | Path, files: list[str]) -> torch.Tensor:
    """The token ids of ``files`` (default: the text shipped with the testbed), concatenated."""
    from testbed.model.loading import load_tokenizer

    tok = load_tokenizer(Path(model_dir))
    text = "\n".join(Path(f).read_text(encoding="utf-8") for f in (files or [str(SHIPPED_TEXT)]))
    return torch.tensor(tok(text)["input_ids"], dtype=torch.int64)


def train_batches(model_dir: str | Path, files: list[str], steps: int, batch: int, seq: int, seed: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return draw_batches(load_ids(model_dir, files), steps, batch, seq, seed)


def run_local(model_dir: str | Path, n_layers: int, batches: list[tuple[torch.Tensor, torch.Tensor]],
              spec: LoraSpec, lr: float, seed: int, micro: int, trainable: set[int] | None = None
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train in this process; (result fields, adapter tensors by global name)."""
    stage = TrainStage(model_dir, 0, n_layers, spec, seed, trainable)
    opt = torch.optim.AdamW(stage.adapters(), lr=lr, weight_decay=0.0)
    losses, step_ms = [], []
    for x, y in batches:
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
