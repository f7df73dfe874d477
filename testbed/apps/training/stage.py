"""One pipeline stage's model: a frozen fp32 shard with LoRA adapters, run with autograd.

The device's stage takes token ids, a middle stage hidden states, the last one also the labels
and returns the loss.  U-shaped (``--head-on-device``): the last server stops before the final norm
and returns its hidden states, and the device's :class:`HeadStage` turns them into the loss with
labels that never leave it.  ``Shard.forward`` is inference-only (no graph), so the layers are driven
here with the same transformers code path.  Saved-for-backward tensors are counted
(:class:`ActivationMeter`), which is the stage's activation memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from testbed.apps.training.lora import LoraSpec, add_adapters


class ActivationMeter:
    """Bytes of tensors autograd keeps for backward, live and peak (saved-tensor hooks)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def hooks(self, held: list[int]):
        def pack(t: torch.Tensor) -> torch.Tensor:
            n = t.numel() * t.element_size()
            held.append(n)
            self.live += n
            self.peak = max(self.peak, self.live)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def release(self, held: list[int]) -> None:
        self.live -= sum(held)
        held.clear()

    def reset_peak(self) -> None:
        self.peak = self.live


@dataclass
class Pending:
    """A micro-batch between its forward and its backward."""

    inp: torch.Tensor  # the input leaf (hidden, requires grad) or the token ids
    out: torch.Tensor  # the output hidden states, or the scaled loss on the last stage
    held: list[int] = field(default_factory=list)
    loss: float = 0.0  # unscaled loss (last stage)


class TrainStage(nn.Module):
    """Layers ``start:end`` of the model in ``model_dir`` with LoRA adapters on the trainable layers."""

    def __init__(self, model_dir: str | Path, start: int, end: int, spec: LoraSpec, seed: int,
                 trainable: set[int] | None = None, head: bool = True) -> None:
        """``head`` False: the last layers without the final norm, head and loss (U-shaped)."""
        super().__init__()
        from testbed.model.shard import Shard

        # the gradient of the input is needed only for adapters upstream; the output's, for any before end
        self.grad_in = start > 0 and (trainable is None or any(t < start for t in trainable))
        self.grad_out = trainable is None or any(t < end for t in trainable)
        self.shard = Shard.load(Path(model_dir), start, end)
        self.has_loss = self.shard.is_last
        if not head:
            self.drop_head()
        self.shard.train(False)  # no dropout anywhere: training is deterministic
        self.named_adapters = add_adapters(self.shard, spec, seed, trainable)
        self.meter = ActivationMeter()

    @property
    def is_first(self) -> bool:
        return self.shard.is_first

    @property
    def is_last(self) -> bool:
        return self.shard.is_last

    def drop_head(self) -> None:
        """U-shaped: the device holds the final norm, head and loss; this stage neither keeps nor runs them"""
        self.has_loss = False
        self.shard.norm = self.shard.lm_head = None

    def adapters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_adapters]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shard
        h = s.embed_tokens(x) if s.is_first else x
        position_ids = torch.arange(h.shape[1]).unsqueeze(0)
        pos_emb = s.rotary_emb(h, position_ids=position_ids)
        h = s._hf_layers(h, None, position_ids, pos_emb)
        return s.lm_head(s.norm(h)) if self.has_loss else h

    def forward_micro(self, x: torch.Tensor, labels: torch.Tensor | None = None, scale: float = 1.0
                      ) -> Pending:
        """Forward one micro-batch keeping its graph; the last stage returns ``loss * scale``."""
        inp = x if self.is_first else x.detach().requires_grad_(self.grad_in)
        held: list[int] = []
        with torch.enable_grad(), self.meter.hooks(held):
            out = self._run(inp)
            loss = None
            if self.has_loss:
                if labels is None:
                    raise ValueError("the last stage needs the labels")
                loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1))
                out = loss * scale
        return Pending(inp, out, held, float(loss.detach()) if loss is not None else 0.0)

    def backward_micro(self, p: Pending, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        """Backward one micro-batch (``grad``: of its output; None on the last stage); the gradient of
        its input activations (None when nothing upstream trains, as on the first stage)."""
        if self.grad_out:
            p.out.backward() if grad is None else p.out.backward(grad)
        self.meter.release(p.held)
        return p.inp.grad if self.grad_in else None


class HeadStage(nn.Module):
    """The final norm, the (frozen) output layer and the loss, on the device of a U-shaped run.

    Its input is the last server's output, a leaf: one micro-batch's forward and backward run back
    to back (:meth:`loss_and_grad`), and the gradient of that input goes back down the chain.  The
    operations are those of :meth:`TrainStage._run` and :meth:`TrainStage.forward_micro`, so the
    figures equal the one-process reference's.  No adapters: peft's LoRA here targets decoder layers.
    """

    def __init__(self, model_dir: str | Path, meter: ActivationMeter, tied: torch.Tensor | None = None
                 ) -> None:
        super().__init__()
        from safetensors import safe_open
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        from testbed.model.shard import load_config

        config = load_config(Path(model_dir))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
            self.norm.weight = nn.Parameter(f.get_tensor("model.norm.weight"), requires_grad=False)
            if "lm_head.weight" in set(f.keys()):
                weight = f.get_tensor("lm_head.weight")
            else:  # tied to the embeddings, which the device holds already
                weight = tied if tied is not None else f.get_tensor("model.embed_tokens.weight")
        self.lm_head.weight = nn.Parameter(weight, requires_grad=False)
        self.requires_grad_(False)
        self.meter = meter
        self.hidden = int(config.hidden_size)
        self.vocab = int(config.vocab_size)

    def loss_and_grad(self, h: torch.Tensor, labels: torch.Tensor, scale: float
                      ) -> tuple[float, torch.Tensor, float, float]:
        """(unscaled loss, gradient of ``loss * scale`` w.r.t. ``h``, forward ms, backward ms) of one
        micro-batch."""
        if labels.shape != h.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} for activations {tuple(h.shape)}")
        inp = h.detach().requires_grad_(True)
        held: list[int] = []
        t0 = time.perf_counter()
        with torch.enable_grad(), self.meter.hooks(held):
            out = self.lm_head(self.norm(inp))
            loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1))
            scaled = loss * scale
        t1 = time.perf_counter()
        scaled.backward()
        self.meter.release(held)
        t2 = time.perf_counter()
        assert inp.grad is not None
        return float(loss.detach()), inp.grad, (t1 - t0) * 1e3, (t2 - t1) * 1e3
