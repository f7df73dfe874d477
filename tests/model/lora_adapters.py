"""Test helpers: a LoRA adapter saved by peft itself (non-zero B) and the merged model's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import torch


def save_peft_adapter(model_dir: Path, out: Path, layers: list[int] | None = None, seed: int = 1,
                      targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
                      scale: float = 0.3) -> Path:
    """``peft.get_peft_model`` on the whole base, every ``lora_B`` drawn at random (peft starts it at
    zero, which would change nothing), saved with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), layers_to_transform=layers,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(out))
    return out


def merged_greedy(model_dir: Path, adapter: Path | None, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of the whole model in fp32, the adapter merged by peft (none: the base), each step
    recomputing the whole sequence."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]
