"""Multi-tenant LoRA serving at an edge: one base model in memory, many adapters, mixed batches.

The base is loaded once; each adapter (peft's LoRA format: a ``LoraConfig`` and its
``lora_A``/``lora_B`` tensors) is added by name.  A batch of requests for different adapters
decodes together: the base layers run once for the whole batch and each adapted layer adds every
row's own low-rank update (the idea of S-LoRA/Punica).  Two backends:

* ``stacked`` (``StackedLora``, default): every adapter's A and B stacked per layer; a mixed batch
  gathers each row's pair and runs two batched matmuls (BGMV), whatever the number of adapters;
* ``peft``: peft's ``PeftModel`` with ``adapter_names=[one per row]`` (its mixed-adapter batches).

Decoding is greedy with a KV cache; prompts of different lengths are left-padded with an attention
mask and per-row positions, so each row computes what it would alone.  With fp32 weights the tokens
equal those of the model with the adapter merged into the base (``merged_model``; tested).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Request:
    adapter: str  # an adapter name, or BASE
    prompt_ids: list[int]


@dataclass
class BatchResult:
    tokens: list[list[int]]
    seconds: float
    new_tokens: int  # tokens generated over all rows (up to each row's end of sequence)
    distinct_adapters: int
    cpu_seconds: float = 0.0  # CPU time of this process (all its threads) while decoding

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def load_base(model_dir: Path, dtype: torch.dtype = torch.float32):
    """The causal LM of a checkpoint directory (tiny or converted SmolLM2), in eval mode."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.eval()


def lora_config(rank: int = 8, alpha: int | None = None, targets: Sequence[str] = ("q_proj", "v_proj")):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def linear_shapes(base) -> dict[str, tuple[int, int]]:
    """Every linear layer of a (not yet LoRA-wrapped) model: name -> (in, out) features."""
    return {name: (m.in_features, m.out_features) for name, m in base.named_modules()
            if isinstance(m, torch.nn.Linear)}


def random_adapter_state(shapes: dict[str, tuple[int, int]], config, seed: int,
                         std: float = 0.05) -> dict[str, torch.Tensor]:
    """A generated adapter in peft's state-dict format with non-zero A and B (a freshly
    initialised LoRA has B = 0 and would not change a token)."""
    gen = torch.Generator().manual_seed(seed)
    targets = set(config.target_modules)
    state: dict[str, torch.Tensor] = {}
    for name, (n_in, n_out) in sorted(shapes.items()):
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn((config.r, n_in), generator=gen) * std
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn((n_out, config.r), generator=gen) * std
    if not state:
        raise ValueError(f"no linear layer named {sorted(targets)} in the model")
    return state


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Slot(torch.nn.Module):
    """A linear layer of the base plus the LoRA update of every adapter, stacked along a first
    axis (index 0: no adapter, all zeros; lower ranks padded with zeros)."""

    def __init__(self, base_layer: torch.nn.Linear, owner: StackedLora) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds the selection
        self.A = torch.zeros((1, 0, base_layer.in_features))
        self.B = torch.zeros((1, base_layer.out_features, 0))  # already multiplied by the scaling
        self.targets = [False]  # per index: does that adapter change this layer?

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        sel = self._owner.selection
        if sel is None:
            return out
        if isinstance(sel, int):  # the whole batch on one adapter
            if not self.targets[sel]:
                return out
            return out + torch.nn.functional.linear(torch.nn.functional.linear(x, self.A[sel]), self.B[sel])
        # one adapter per row: gather each row's A and B, two batched matmuls (BGMV)
        h = torch.bmm(x, self.A[sel].transpose(1, 2))
        return out + torch.bmm(h, self.B[sel].transpose(1, 2))


class StackedLora:
    """LoRA adapters on one base model, applied per row of a batch by gathered batched matmuls
    (the idea of Punica's BGMV kernel) instead of peft's loop over the adapters of a batch: the
    cost of a mixed batch does not grow with its number of distinct adapters.  Adapters come
    in peft's format; the arithmetic is the same as peft's LoRA forward (base output plus
    ``scaling x B(A x)``), so fp32 tokens equal those of the merged model (tested)."""

    def __init__(self, base) -> None:
        self.base = base
        self.names: list[str] = []  # adapter k is index k + 1
        self.selection: int | torch.Tensor | None = None
        self.slots: dict[str, _Slot] = {}

    def _slot(self, name: str) -> _Slot:
        if name not in self.slots:
            parent_name, _, child = name.rpartition(".")
            parent = self.base.get_submodule(parent_name)
            layer = getattr(parent, child)
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(f"{name} is not a linear layer")
            slot = _Slot(layer, self)
            n = len(self.names) + 1
            slot.A = torch.zeros((n, 0, layer.in_features))
            slot.B = torch.zeros((n, layer.out_features, 0))
            slot.targets = [False] * n
            setattr(parent, child, slot)
            self.slots[name] = slot
        return self.slots[name]

    def add(self, name: str, config, state: dict[str, torch.Tensor]) -> None:
        if getattr(config, "use_dora", False) or getattr(config, "alpha_pattern", None):
            raise ValueError(f"adapter {name}: DoRA and per-layer alphas need the peft backend")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            mod, _, rest = key.removeprefix("base_model.model.").rpartition(".lora_")
            if rest not in ("A.weight", "B.weight"):
                raise ValueError(f"adapter {name}: unexpected tensor {key}")
            pairs.setdefault(mod, {})[rest[0]] = t.to(torch.float32)
        for mod, ab in pairs.items():
            if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
                raise ValueError(f"adapter {name}: {mod} needs lora_A and lora_B of one rank")
        self.names.append(name)
        for slot in self.slots.values():  # a new index, zero until set below
            slot.A = torch.cat([slot.A, slot.A.new_zeros((1, *slot.A.shape[1:]))])
            slot.B = torch.cat([slot.B, slot.B.new_zeros((1, *slot.B.shape[1:]))])
            slot.targets.append(False)
        idx = len(self.names)
        for mod, ab in pairs.items():
            slot = self._slot(mod)
            r = ab["A"].shape[0]
            alpha = config.lora_alpha
            scaling = alpha / math.sqrt(r) if getattr(config, "use_rslora", False) else alpha / r
            if r > slot.A.shape[1]:  # pad every adapter to the largest rank
                grow = r - slot.A.shape[1]
                slot.A = torch.cat([slot.A, slot.A.new_zeros((slot.A.shape[0], grow, slot.A.shape[2]))], 1)
                slot.B = torch.cat([slot.B, slot.B.new_zeros((slot.B.shape[0], slot.B.shape[1], grow))], 2)
            slot.A[idx].zero_()
            slot.B[idx].zero_()
            slot.A[idx, :r] = ab["A"]
            slot.B[idx, :, :r] = ab["B"] * scaling
            slot.targets[idx] = True

    def remove(self, name: str) -> None:
        idx = self.names.index(name) + 1
        keep = [i for i in range(len(self.names) + 1) if i != idx]
        for slot in self.slots.values():
            slot.A, slot.B = slot.A[keep].contiguous(), slot.B[keep].contiguous()
            slot.targets = [slot.targets[i] for i in keep]
        self.names.remove(name)

    def select(self, names: Sequence[str]) -> None:
        """The adapter of each row of the next forwards (BASE: none)."""
        idx = [0 if n == BASE else self.names.index(n) + 1 for n in names]
        self.selection = idx[0] if len(set(idx)) == 1 else torch.tensor(idx)

    def nbytes(self) -> int:
        return sum(tensor_bytes([s.A, s.B]) for s in self.slots.values())


BACKENDS = ("stacked", "peft")


class AdapterServer:
    """One base model, adapters added by name, batched greedy generation across adapters.

    ``backend``: ``stacked`` (``StackedLora``, the default) or ``peft`` (peft's ``PeftModel``
    with ``adapter_names=`` per row); both produce the merged model's tokens."""

    def __init__(self, base, backend: str = "stacked") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend})")
        self.backend = backend
        self.base_bytes = tensor_bytes({id(p): p for p in base.parameters()}.values())
        self.shapes = linear_shapes(base)  # before LoRA wraps the layers
        self.config = base.config
        self._base = base
        self.peft = None  # the PeftModel once the first adapter arrives (peft backend)
        self.stacked = StackedLora(base) if backend == "stacked" else None
        self.adapter_bytes: dict[str, int] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_bytes)

    def add_adapter(self, name: str, config, state: dict[str, torch.Tensor]) -> None:
        """Add an adapter from peft's state dict (``adapter_model.safetensors``'s tensors)."""
        if name == BASE or name in self.adapter_bytes:
            raise ValueError(f"adapter name {name!r} is taken")
        if self.stacked is not None:
            self.stacked.add(name, config, state)
        else:
            self._add_peft(name, config, state)
        self.adapter_bytes[name] = tensor_bytes(state.values())

    def _add_peft(self, name: str, config, state: dict[str, torch.Tensor]) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        if self.peft is None:
            self.peft = get_peft_model(self._base, copy.deepcopy(config), adapter_name=name)
        else:
            self.peft.add_adapter(name, copy.deepcopy(config))
        result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
        if missing:
            self.peft.delete_adapter(name)
            raise ValueError(f"adapter {name}: {len(missing)} LoRA tensors missing (e.g. {missing[0]})")
        self.peft.eval()

    def load_adapter_dir(self, name: str, path: Path) -> None:
        """Add an adapter saved by peft (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        from peft import LoraConfig
        from safetensors.torch import load_file

        cfg = LoraConfig.from_pretrained(str(path))
        state = load_file(str(Path(path) / "adapter_model.safetensors"))
        self.add_adapter(name, cfg, state)

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapter_bytes:
            return
        if self.stacked is not None:
            self.stacked.remove(name)
        elif self.peft is not None:
            self.peft.delete_adapter(name)
        del self.adapter_bytes[name]

    def memory(self) -> dict:
        """Bytes held: the base once, plus each adapter's tensors (``resident_adapter_bytes``:
        what the backend allocates for them, rank padding included)."""
        adapters = sum(self.adapter_bytes.values())
        resident = self.stacked.nbytes() if self.stacked is not None else adapters
        return {"base_bytes": self.base_bytes, "adapter_bytes": adapters, "adapters": len(self.adapter_bytes),
                "total_bytes": self.base_bytes + adapters, "resident_adapter_bytes": resident,
                "backend": self.backend}

    def _prepare(self, names: list[str]) -> tuple[torch.nn.Module, dict]:
        """The module to call and its extra forward arguments for a batch of ``names``."""
        if self.stacked is not None:
            self.stacked.select(names)
            return self._base, {}
        if self.peft is None:
            return self._base, {}
        if len(set(names)) == 1 and names[0] != BASE:
            self.peft.set_adapter(names[0])  # one adapter: peft's plain path
            return self.peft, {}
        return self.peft, {"adapter_names": names}

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], max_new_tokens: int,
                 eos: set[int] | None = None) -> BatchResult:
        """Greedy-decode every request in one batch; each row stops at its own end of sequence."""
        from transformers import DynamicCache

        for r in requests:
            if r.adapter != BASE and r.adapter not in self.adapter_bytes:
                raise KeyError(f"no adapter {r.adapter!r} here")
            if not r.prompt_ids:
                raise ValueError("empty prompt")
        names = [r.adapter for r in requests]
        model, kwargs = self._prepare(names)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's last prompt token is at the end
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = eos or set()
        out: list[list[int]] = [[] for _ in requests]
        done = [False] * len(requests)
        t0, c0 = time.perf_counter(), time.process_time()
        cache = DynamicCache()
        step_ids, step_pos = ids, positions
        try:
            for _ in range(max_new_tokens):
                res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, cache=cache,
                            use_cache=True, **kwargs)
                nxt = res.logits[:, -1, :].argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        out[i].append(t)
                        done[i] = t in eos
                if all(done):
                    break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((len(requests), 1), dtype=torch.long)], dim=1)
        finally:
            if self.stacked is not None:
                self.stacked.selection = None
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return BatchResult(out, seconds, sum(map(len, out)), len(set(names)), cpu)


def merged_model(base, config, state: dict[str, torch.Tensor]):
    """``base`` (a plain model, changed in place) with one adapter merged into its weights:
    the exactness reference, built by peft."""
    from peft import get_peft_model, set_peft_model_state_dict

    m = get_peft_model(base, copy.deepcopy(config), adapter_name="ref")
    set_peft_model_state_dict(m, state, adapter_name="ref")
    return m.merge_and_unload().eval()


@torch.inference_mode()
def greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: set[int] | None = None) -> list[int]:
    """Greedy decoding of one prompt with a plain model (no batch, no padding)."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    cache = DynamicCache()
    for _ in range(max_new_tokens):
        res = model(input_ids=ids, cache=cache, use_cache=True)
        t = int(res.logits[0, -1].argmax())
        out.append(t)
        if eos and t in eos:
            break
        ids = torch.tensor([[t]])
    return out


# ---- serve-bench ----------------------------------------------------------------------------


@dataclass
class BenchSetup:
    server: AdapterServer
    prompts: list[list[int]]
    eos: set[int] = field(default_factory=set)


def bench_setup(model_dir: Path, adapters: int, rank: int, seed: int, prompts: Sequence[str],
                backend: str = "stacked") -> BenchSetup:
    from testbed.model.loading import format_prompt, load_tokenizer

    base = load_base(model_dir)
    server = AdapterServer(base, backend)
    cfg = lora_config(rank)
    for k in range(adapters):
        server.add_adapter(f"a{k}", cfg, random_adapter_state(server.shapes, cfg, seed=seed + k, std=0.02))
    tok = load_tokenizer(model_dir)
    return BenchSetup(server, [format_prompt(tok, p) for p in prompts])


def batch_of(setup: BenchSetup, batch: int, distinct: int) -> list[Request]:
    """``batch`` requests spread over the first ``distinct`` adapters (round robin)."""
    names = setup.server.adapters
    return [Request(names[i % distinct], setup.prompts[i % len(setup.prompts)]) for i in range(batch)]


def measure(setup: BenchSetup, requests: list[Request], tokens: int, repeats: int,
            one_by_one: bool = False) -> dict:
    """tokens/s of ``requests`` in one batch (or one request after another), median of ``repeats``;
    also tokens per CPU-second of this process (on a machine shared with other busy processes,
    wall-clock rates measure the others' load as much as this code)."""
    rates, cpu_rates = [], []
    for _ in range(repeats):
        results = [setup.server.generate([r], tokens) for r in requests] if one_by_one else \
            [setup.server.generate(requests, tokens)]
        n = sum(r.new_tokens for r in results)
        rates.append(n / sum(r.seconds for r in results))
        cpu_rates.append(n / max(1e-9, sum(r.cpu_seconds for r in results)))
    return {"tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "tokens_per_cpu_s": statistics.median(cpu_rates), "cpu_min": min(cpu_rates),
            "cpu_max": max(cpu_rates), "repeats": repeats}


DEFAULT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                   "Explain what a network link is.", "Name three colours.",
                   "How do plants grow?", "Tell me a short joke.", "What is two plus two?",
                   "Describe a mountain in one sentence.")


def serve_bench(args) -> int:
    """``testbed serve-bench``: tokens/s against distinct adapters per batch; memory = base + adapters."""
    from testbed.model.loading import prepare_model_dir
    from testbed.spec.errors import SpecError

    if args.adapters < 1 or args.batch < 1:
        raise SpecError("serve-bench", "--adapters/--batch",
                        f"must be >= 1 (got {args.adapters}, {args.batch})")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = bench_setup(prepare_model_dir(args.model), args.adapters, args.rank, args.seed, DEFAULT_PROMPTS,
                        args.backend)
    top = min(args.adapters, args.batch)
    counts = sorted({1, top} | {2 ** k for k in range(int(math.log2(top)) + 1)})
    measure(setup, batch_of(setup, min(2, args.batch), 1), 2, 1)  # warm-up: first calls allocate
    rows = []
    for d in counts:
        m = measure(setup, batch_of(setup, args.batch, d), args.tokens, args.repeats)
        rows.append({"distinct_adapters": d, **m})
    out = {"backend": args.backend, "batch": args.batch, "adapters": args.adapters, "rank": args.rank,
           "tokens": args.tokens,
           "threads": torch.get_num_threads(), "memory": setup.server.memory(), "rows": rows,
           "generated_adapters": True}
    if args.json:
        print(json.dumps(out))
    else:
        mem = out["memory"]
        print(f"memory: base {mem['base_bytes'] / 1e6:.1f} MB + {mem['adapters']} adapters "
              f"{mem['adapter_bytes'] / 1e6:.2f} MB = {mem['total_bytes'] / 1e6:.1f} MB (generated adapters)")
        for r in rows:
            print(f"batch {args.batch}, {r['distinct_adapters']} distinct adapters: "
                  f"{r['tokens_per_s']:.1f} tokens/s "
                  f"(min {r['min']:.1f}, max {r['max']:.1f}, {r['repeats']} repeats)")
    return 0
