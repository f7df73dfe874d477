"""LoRA adapters in peft's format, served by shards: checked against the base model, merged per shard.

An adapter folder is what ``peft.PeftModel.save_pretrained`` writes (and ``testbed train`` saves):
``adapter_config.json`` and ``adapter_model.safetensors`` with tensors named
``base_model.model.model.layers.N.<module>.lora_A.weight`` / ``lora_B.weight``.

:func:`check_adapter` reads the folder once, before any network or node starts, and names the first
problem as one line (``FILE: field: problem (got VALUE)``): a missing folder or file, a kind of
adapter that cannot be served (not LoRA; tensors other than decoder-layer ``lora_A``/``lora_B``, such
as DoRA magnitudes, embedding or head adapters, ``modules_to_save``), layers the model does not have,
or shapes that do not fit the base's linear layers (an adapter of another base).

:func:`merge_adapter` is what each shard does with it: peft injects LoRA into the shard's own layers
(named as in the whole model, so ``layers_to_transform`` and ``rank_pattern`` mean what they meant
when the adapter was saved), loads the tensors of those layers and merges them with peft's own
``merge_and_unload``.  The merged fp32 weights are bit for bit those of
``PeftModel.from_pretrained(base, DIR).merge_and_unload()``, and the shard then runs as a plain one
(no LoRA cost per token).  A quantized shard quantizes the merged weights (``Shard.load``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.spec.errors import SpecError, got

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how peft names a causal LM's tensors in its saved adapters
if TYPE_CHECKING:  # torch loads only where a shard is built (node settings import this module)
    import torch
    from torch import nn

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.([A-Za-z0-9_.]+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """A checked adapter folder: its layers (global indices, sorted), rank and alpha, target modules."""

    path: Path
    layers: tuple[int, ...]
    rank: int
    alpha: float
    targets: tuple[str, ...]


def folder_problem(path: str | Path) -> str | None:
    """What a node program's ``adapter`` setting lacks (cheap: the files only), or None."""
    p = Path(path)
    if not p.is_dir():
        return "must be a peft adapter folder (no such folder)"
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (p / n).is_file()]
    if missing:
        return f"must be a peft adapter folder (no {', '.join(missing)})"
    return None


def _config(path: Path) -> dict:
    f = path / CONFIG_FILE
    try:
        cfg = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpecError(f, "adapter_config", f"not readable JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise SpecError(f, "adapter_config", f"must be a JSON object {got(type(cfg).__name__)}")
    if cfg.get("peft_type") != "LORA":
        raise SpecError(f, "peft_type", f"only LoRA adapters can be served {got(cfg.get('peft_type'))}")
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise SpecError(f, flag, f"cannot be served: plain LoRA only {got(cfg.get(flag))}")
    if cfg.get("modules_to_save"):
        raise SpecError(f, "modules_to_save", f"cannot be served: LoRA of decoder layers only "
                                              f"{got(cfg.get('modules_to_save'))}")
    return cfg


def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear module of one decoder layer, by its path in the layer."""
    import torch
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0)
    return {n: (m.out_features, m.in_features) for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def check_adapter(path: str | Path, model_dir: str | Path, source: str = "--adapter") -> AdapterInfo:
    """The adapter at ``path`` checked against the model in ``model_dir``; SpecError (one line) if it
    cannot be served.  ``source``: where the path was given (named when the folder is missing)."""
    from safetensors import safe_open

    from testbed.model.shard import load_config

    p = Path(path)
    if (problem := folder_problem(p)) is not None:
        raise SpecError(source, "adapter", f"{problem} {got(str(path))}")
    cfg = _config(p)
    config = load_config(Path(model_dir))
    n_layers = int(config.num_hidden_layers)
    shapes = _linear_shapes(config)
    wfile = p / WEIGHTS_FILE
    layers: set[int] = set()
    try:
        with safe_open(str(wfile), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise SpecError(wfile, "tensors", f"not a readable safetensors file ({type(e).__name__})") from None
    ranks: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for key, shape in sorted(found.items()):
        m = _KEY.match(key)
        if m is None:
            raise SpecError(wfile, "tensors", f"only lora_A/lora_B of decoder layers can be served "
                                              f"{got(key)}")
        index, module, ab = int(m[1]), m[2], m[3]
        if index >= n_layers:
            raise SpecError(wfile, "layers", f"layer {index} is not one of the model's {n_layers} layers "
                                             f"(an adapter of another base?) {got(key)}")
        if module not in shapes:
            raise SpecError(wfile, "tensors", f"no linear layer {module!r} in the model's decoder layers "
                                              f"{got(key)}")
        if len(shape) != 2:
            raise SpecError(wfile, key, f"must be a matrix {got(list(shape))}")
        ranks.setdefault((index, module), {})[ab] = shape
        layers.add(index)
    for (index, module), pair in sorted(ranks.items()):
        out_f, in_f = shapes[module]
        name = f"{PEFT_PREFIX}model.layers.{index}.{module}"
        if set(pair) != {"A", "B"}:
            lacking = "lora_B" if "A" in pair else "lora_A"
            raise SpecError(wfile, "tensors", f"{name} has no {lacking} {got(name)}")
        a, b = pair["A"], pair["B"]
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise SpecError(wfile, f"{name}.lora_A/B", f"shapes {list(a)} and {list(b)} do not fit the "
                                                       f"base's {module} ({in_f} in, {out_f} out): an "
                                                       f"adapter of another base? {got([list(a), list(b)])}")
        if not cfg.get("rank_pattern") and a[0] != cfg.get("r"):
            raise SpecError(p / CONFIG_FILE, "r", f"{name} has rank {a[0]}, the config another "
                                                 f"{got(cfg.get('r'))}")
    targets = cfg.get("target_modules") or []
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))  # peft: a regex or names
    return AdapterInfo(p, tuple(sorted(layers)), int(cfg.get("r", 0)), float(cfg.get("lora_alpha", 0)),
                       targets)


def _layer_tensors(path: Path, start: int, end: int) -> dict[int, dict[str, torch.Tensor]]:
    """The adapter's tensors of layers ``start:end``, by layer, named as peft's state dict of a module
    whose layers sit at ``model.layers.N`` (the saved name less ``base_model.model.``)."""
    from safetensors import safe_open

    out: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no iteration
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"{path / WEIGHTS_FILE}: {key}: not a decoder layer's LoRA tensor")
            index = int(m[1])
            if start <= index < end:
                out.setdefault(index, {})[key.removeprefix(PEFT_PREFIX)] = f.get_tensor(key)
    return out


def merge_adapter(shard: nn.Module, path: str | Path) -> list[int]:
    """Merge the adapter's LoRA of the shard's own layers into their fp32 weights, in place, with peft
    (inject, load, ``merge_and_unload``).  Returns the global indices of the layers it changed; layers
    the adapter does not cover stay as they are."""
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.tuners.lora import LoraModel
    from torch import nn

    path = Path(path)
    tensors = _layer_tensors(path, shard.start, shard.end)
    if not tensors:
        return []
    # the shard's adapted layers under their names in the whole model (model.layers.N)
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleDict({str(i): shard.layers[i - shard.start] for i in sorted(tensors)})
    config = LoraConfig.from_pretrained(str(path))
    config.inference_mode = True
    lora = LoraModel(holder, config, "default")
    state = {k: v for layer in tensors.values() for k, v in layer.items()}
    loaded = set_peft_model_state_dict(holder, state)
    if loaded.unexpected_keys:
        raise ValueError(f"{path / WEIGHTS_FILE}: tensors that fit no module: {loaded.unexpected_keys[:3]}")
    lora.merge_and_unload()
    shard.requires_grad_(False)
    return sorted(tensors)
