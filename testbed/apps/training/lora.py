"""LoRA adapters (``peft``) on a shard's decoder layers, named as in the whole model.

Every adapter tensor is named by its place in the whole model (``model.layers.7.self_attn.q_proj``),
and each LoRA ``A`` matrix is drawn from a generator seeded by the run's seed and that name: a
layer gets the same initial adapter whichever stage holds it, so a split run and the one-process
reference (``--local``) start from identical weights.  ``B`` starts at zero (peft's default).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from testbed.apps.training import defaults

PEFT_PREFIX = "base_model.model."  # how peft names a causal LM's tensors in adapter_model.safetensors


@dataclass(frozen=True)
class LoraSpec:
    rank: int = defaults.RANK
    alpha: float = float(defaults.ALPHA)
    targets: tuple[str, ...] = defaults.TARGET_MODULES

    def config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          lora_dropout=defaults.DROPOUT, bias="none")


def _seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def add_adapters(shard: nn.Module, spec: LoraSpec, seed: int, trainable: set[int] | None = None
                 ) -> list[tuple[str, nn.Parameter]]:
    """Inject LoRA into the shard's layers whose global index is in ``trainable`` (None: all).

    Returns ``(global name, parameter)`` of every adapter tensor, in layer order: the order in which
    they travel on the wire and are saved.  The base weights stay frozen.
    """
    from peft import inject_adapter_in_model

    out: list[tuple[str, nn.Parameter]] = []
    for local, layer in enumerate(shard.layers):
        index = shard.start + local
        if trainable is not None and index not in trainable:
            continue
        inject_adapter_in_model(spec.config(), layer)
        for pname, p in layer.named_parameters():
            if "lora_" not in pname:
                p.requires_grad_(False)
                continue
            # "self_attn.q_proj.lora_A.default.weight" -> peft's saved "...q_proj.lora_A.weight"
            name = f"model.layers.{index}.{pname.replace('.default', '')}"
            if p.device.type != "meta":
                with torch.no_grad():
                    if ".lora_A." in name:
                        g = torch.Generator().manual_seed(_seed(seed, name))
                        nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=g)
                    else:
                        p.zero_()
            p.requires_grad_(True)
            out.append((name, p))
    return out


def adapter_layout(config, start: int, end: int, spec: LoraSpec, trainable: set[int] | None = None
                   ) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the adapters of layers ``start:end`` without loading any weight."""
    from testbed.model.shard import Shard

    with torch.device("meta"):
        shard = Shard(config, start, end)
        named = add_adapters(shard, spec, 0, trainable)
    return [(n, tuple(p.shape)) for n, p in named]


def flatten(named: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The parameters one after another, in their own dtype (float32 adapters stay float32: on the
    wire that is exact at half float64's bytes)."""
    return torch.cat([p.detach().reshape(-1) for _, p in named]) if named else torch.zeros(0)


def unflatten(flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Named float32 tensors from ``flat`` (at least as long as the layout; padding is dropped)."""
    out: dict[str, torch.Tensor] = {}
    i = 0
    for name, shape in layout:
        n = math.prod(shape)
        if i + n > flat.numel():
            raise ValueError(f"{flat.numel()} adapter values, the layout needs more ({name})")
        out[name] = flat[i:i + n].reshape(shape).to(torch.float32).clone()
        i += n
    return out


def save_adapters(out_dir: Path, tensors: dict[str, torch.Tensor], spec: LoraSpec, base_model: str) -> Path:
    """Write ``tensors`` (global names) as a peft adapter folder: adapter_config.json and
    adapter_model.safetensors, loadable by ``peft.PeftModel.from_pretrained(base, out_dir)``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = spec.config()
    config.base_model_name_or_path = str(base_model)
    config.task_type = "CAUSAL_LM"
    config.save_pretrained(str(out_dir))
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()},
              str(out_dir / "adapter_model.safetensors"))
    (out_dir / "README.md").unlink(missing_ok=True)
    return out_dir


def read_config(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "adapter_config.json").read_text())
