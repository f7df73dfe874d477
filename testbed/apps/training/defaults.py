"""Default training settings: LoRA rank, alpha, targets, learning rate, batch shape.

Chosen so that a few dozen steps of batch 4 x 64 tokens on a user's text visibly lower its held-out
perplexity with SmolLM2-135M (bench/train_defaults.py measures it; figures in bench/README.md):

* every linear layer of a block is adapted (attention and MLP): with so few steps, adapting the MLP as
  well as q/v gives the adapters room to take on a text's vocabulary and style;
* rank 8, alpha 16 (a scale of 2): the usual small-rank setting; rank barely matters at this length;
* learning rate 1e-3 with AdamW: LoRA's B starts at zero, so a rate near the full fine-tuning one
  (5e-5) would leave the adapters almost unchanged after 50 steps; 1e-3 lowers perplexity clearly
  without the loss jumping on these short runs;
* no dropout and no weight decay: the split run must equal ``--local`` bit for bit in fp32, and dropout
  draws random numbers on every node.

Public API: the constants below and :func:`lora_config`.
"""

from __future__ import annotations

from collections.abc import Sequence

LR = 1e-3
RANK = 8
ALPHA = 16
DROPOUT = 0.0
WEIGHT_DECAY = 0.0
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BATCH = 4
SEQ = 64
STEPS = 50
SEED = 0


def lora_config(rank: int = RANK, alpha: int = ALPHA, targets: Sequence[str] = TARGET_MODULES,
                layers: Sequence[int] | None = None):
    """peft's ``LoraConfig`` for a causal LM with these settings; ``layers``: the adapted layer indices
    (``freeze.adapter_layers``), None for all."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=DROPOUT, target_modules=list(targets),
                      layers_to_transform=None if layers is None else list(layers), bias="none",
                      task_type="CAUSAL_LM")
