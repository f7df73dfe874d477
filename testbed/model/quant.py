"""Quantized shards: bf16, int8 (per-channel, column-chunked) and int4 (group-wise; the GGUF Q4_1 grid when
there is one, with its fp16 scales kept exact).

Linear weights are replaced in place by modules that run torch's CPU weight-only kernels on bf16
activations (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``); q/k/v and gate/up are fused into
one call each; the residual stream, norms and attention stay fp32.
For prompts (many rows) the weights are dequantized once per call and multiplied in fp32 (or, with
``bf16_prefill``, a kept bf16 copy is used), because the weight-only kernels fall behind a dense GEMM there.
The output layer scores the whole vocabulary with int4 (or int8) weights and recomputes the best
``head_topk`` candidates exactly from the fp32 embedding table, so the greedy choice rarely changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

INT4_GROUP = 32
TOPK = 32
DENSE_ROWS = 32  # from this many rows on, dequantize and use a dense fp32 GEMM


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _dense(lin: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """Many rows: a dense GEMM, on the cached bf16 copy if there is one, else on weights dequantized now."""
    cached = getattr(lin, "dense_bf16", None)
    if cached is not None:
        return nn.functional.linear(x2.to(torch.bfloat16), cached).float()
    return nn.functional.linear(x2.float(), lin.dequantized())


def keep_bf16_prefill_copy(shard) -> int:
    """Keep a dense bf16 copy of every quantized linear weight for prompts; returns the bytes added."""
    added = 0
    scorer = getattr(shard.lm_head, "scorer", None)  # the output layer never takes the dense path
    for mod in shard.modules():
        if isinstance(mod, Int4Linear | Int8Linear) and mod is not scorer and not hasattr(mod, "dense_bf16"):
            mod.register_buffer("dense_bf16", mod.dequantized().to(torch.bfloat16).contiguous())
            added += mod.dense_bf16.numel() * 2
    return added


class Bf16Linear(nn.Module):
    """bf16 weights and activations; fp32 in and out."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


class _WeightOnlyLinear(nn.Module):
    """A linear layer on low-precision weights: few rows (decode) through the weight-only kernel
    (``_mm``, bf16 activations), many rows (prompts) through :func:`_dense`."""

    out_features: int

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        if x2.shape[0] >= DENSE_ROWS:
            y = _dense(self, x2)
        else:
            y = self._mm(x2.to(torch.bfloat16))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(_WeightOnlyLinear):
    """Symmetric int8 weights with one scale per output channel and per column chunk.

    With ``chunks`` > 1 each row is split into that many column chunks with their own scale.  The kernel
    only takes one scale per row, so the chunked weight is stored as ``chunks * n`` rows of ``k / chunks``
    inputs and the input row is folded into ``chunks`` rows: the kernel reads every weight once (the cost
    of one call) and the wanted products are the diagonal blocks of its output, summed.
    """

    def __init__(self, weight: torch.Tensor, chunks: int = 1) -> None:
        super().__init__()
        n, k = weight.shape
        # the kernel crashes on inputs whose length is not a multiple of 16: use fewer chunks then
        while chunks > 1 and (k % chunks or (k // chunks) % 16):
            chunks -= 1
        self.out_features, self.in_features, self.chunks = n, k, chunks
        # [n, k] -> [chunks * n, k / chunks]: chunk i of every row, then chunk i + 1 ...
        blocks = weight.float().view(n, chunks, k // chunks).transpose(0, 1).reshape(chunks * n, k // chunks)
        q, scale = quantize_int8(blocks)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scale)

    def dequantized(self) -> torch.Tensor:
        n, k, c = self.out_features, self.in_features, self.chunks
        w = self.qweight.float() * self.scales.float()[:, None]
        return w.view(c, n, k // c).transpose(0, 1).reshape(n, k)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        c, n = self.chunks, self.out_features
        if c == 1:
            return torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        m = x2.shape[0]
        y = torch._weight_int8pack_mm(x2.reshape(m * c, -1), self.qweight, self.scales)
        return y.view(m, c, c, n).diagonal(dim1=1, dim2=2).sum(-1, dtype=torch.float32)


class Int4Linear(_WeightOnlyLinear):
    """Asymmetric group-wise int4: ``w = d * q + m`` with codes ``q`` in 0..15, one (d, m) per 32 inputs.

    The kernel takes bf16 scales and zeros, but the GGUF's fp16 ``d`` (and ``m + 8 d``) are mostly not
    bf16 numbers, so rounding them moves every weight of the group.  With ``exact`` the codes are stored
    twice along the input axis, the second copy carrying the bf16 remainders of scale and zero; the input
    row is duplicated to match, so one kernel call sums both parts in its fp32 accumulator and the weights
    are the grid's to ~2^-17 (at twice the weight bytes per call).
    """

    def __init__(
        self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int = INT4_GROUP,
        exact: bool = False,
    ) -> None:
        super().__init__()
        n, k = codes.shape
        self.out_features, self.in_features, self.group, self.exact = n, k, group, exact
        c32 = codes.to(torch.int32)
        self.register_buffer(
            "packed", torch._convert_weight_to_int4pack_for_cpu(torch.cat([c32, c32], 1) if exact else c32, 2)
        )
        # the codes again, two per byte, for the dense prompt path (cheap to unpack, unlike the kernel layout)
        c = codes.to(torch.uint8)
        self.register_buffer("nibbles", (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous())
        self.register_buffer("d", d.float().contiguous())
        self.register_buffer("m", m.float().contiguous())
        # the kernel computes (q - 8) * scale + zero, so zero = m + 8 d
        d, m = d.float(), m.float()
        sz = torch.stack([d, m + 8.0 * d], dim=-1).transpose(0, 1).contiguous()  # [k/group, n, 2]
        hi = sz.to(torch.bfloat16)
        if exact:
            hi = torch.cat([hi, (sz - hi.float()).to(torch.bfloat16)], 0)
        self.register_buffer("scales_zeros", hi.contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int = INT4_GROUP, exact: bool = False) -> Int4Linear:
        """Round a float weight to its own min/max grid per group (lossy: error reported by quant-eval)."""
        codes, d, m = quantize_int4(weight, group)
        return cls(codes, d, m, group, exact)

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        codes = torch.stack([self.nibbles & 0x0F, self.nibbles >> 4], dim=-1)
        codes = codes.view(n, k // self.group, self.group)
        return (codes.float() * self.d[..., None] + self.m[..., None]).view(n, k)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        if self.exact:
            x2 = torch.cat([x2, x2], -1)
        return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)


def quantize_int8(w: torch.Tensor, clips: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 codes and bf16 scales; each row's clipping range is the one (of ``clips`` tried,
    from the full range down to 70% of it) with the least squared error."""
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / 127.0
    for frac in torch.linspace(1.0, 0.7, clips).tolist():
        # scales are rounded to bf16 (the kernel's type) before the codes are chosen for them
        scale = (amax * frac / 127.0).to(torch.bfloat16).float()
        q = torch.round(w / scale[:, None]).clamp(-127, 127)
        err = ((q * scale[:, None] - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    q = torch.round(w / best_scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, best_scale.to(torch.bfloat16)


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, ...]:
    """Codes (uint8 0..15), scales and mins per group of ``group`` inputs from a float weight."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {group}")
    w = weight.float().view(n, k // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    d = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / d[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(n, k), d, lo


class CandidateHead(nn.Module):
    """Output layer: int8/int4 scores for the whole vocabulary, the top ``k`` recomputed exactly in fp32."""

    def __init__(self, weight: torch.Tensor, k: int = TOPK, bits: int = 8) -> None:
        super().__init__()
        self.scorer = Int8Linear(weight) if bits == 8 else Int4Linear.from_float(weight)
        self.register_buffer("table", weight.float().contiguous())
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x).float()
        scores = self.scorer._mm(x2.to(torch.bfloat16)).float()
        idx = scores.topk(self.k, dim=-1).indices  # [rows, k]
        exact = torch.einsum("rh,rkh->rk", x2, self.table[idx])
        scores.scatter_(-1, idx, exact)
        return scores.reshape(*x.shape[:-1], -1)


_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class QuantOptions:
    """Choices measured side by side by ``bench/model_quant.py``; the defaults are the shipped ones."""

    int4_exact: str = "all"  # where to carry the bf16 remainders of the scales/zeros: all, attn, mlp, none
    head_bits: int = 4  # output-layer scorer (the top ``head_topk`` are recomputed exactly anyway)
    int8_chunks: int = 4  # int8 scales per row (column chunks)
    fuse: bool = True  # one kernel call for q/k/v and one for gate/up
    head_topk: int = TOPK
    bf16_prefill: bool = False  # keep a dense bf16 copy of the weights for prompts (faster, +2 B/weight)


class FusedLinear(nn.Module):
    """Several linear layers that read the same input, run as one kernel call over their stacked rows.

    The parts (``part(i)``) stand in for the original modules: the first computes all outputs and keeps
    them for the others, which reuse them when called with the very same input tensor (as LLaMA's
    attention and MLP do) and compute on their own otherwise.
    """

    def __init__(self, inner: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.inner, self.sizes = inner, sizes
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def run(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0 or x is not self._input:
            self._outputs = self.inner(x).split(self.sizes, dim=-1)
            self._input = x
        out = self._outputs[index]
        if index == len(self.sizes) - 1:
            self._input, self._outputs = None, ()
        return out

    def part(self, index: int) -> nn.Module:
        return _FusedPart(self, index)


class _FusedPart(nn.Module):
    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the parent owns it once
        self.index = index
        self.out_features = fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.run(self.index, x)


def _gguf_grid(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The raw Q4_1 codes/scales/mins for ``names`` if the checkpoint came from a Q4_1 GGUF."""
    from safetensors import safe_open

    from testbed.model.loading import Q4_FILE

    path = Path(model_dir) / Q4_FILE
    if not path.exists():
        return None
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for n in names:
            for part in ("q", "d", "m"):
                key = f"{n}.{part}"
                if key not in keys:
                    return None
                out[key] = f.get_tensor(key)
    return out


def _make(quant: str, w: torch.Tensor, grid: dict | None, names: list[str], opts: QuantOptions) -> nn.Module:
    """One quantized module for the (row-stacked) weight ``w`` of checkpoint tensors ``names``."""
    exact = opts.int4_exact == "all" or f".{opts.int4_exact}." in names[0].replace("self_attn", "attn")
    if quant == "bf16":
        return Bf16Linear(w)
    if quant == "int8":
        return Int8Linear(w, opts.int8_chunks)
    if quant == "int4" and grid is not None:
        codes, d, m = (torch.cat([grid[f"{n}.{p}"] for n in names]) for p in ("q", "d", "m"))
        return Int4Linear(codes, d, m, exact=exact)
    if quant == "int4":
        return Int4Linear.from_float(w, exact=exact)
    raise ValueError(f"unknown quant {quant!r}")


def quantize_shard(shard, quant: str, model_dir: Path, opts: QuantOptions | None = None) -> None:
    """Replace the shard's linear layers (and output layer) by ``quant`` versions, in place."""
    opts = opts or QuantOptions()
    if quant not in ("bf16", "int8", "int4"):
        raise ValueError(f"unknown quant {quant!r}")
    parents: list[tuple[nn.Module, str]] = []  # (module, checkpoint prefix)
    for local, layer in enumerate(shard.layers):
        prefix = f"model.layers.{shard.start + local}"
        parents += [(layer.self_attn, f"{prefix}.self_attn"), (layer.mlp, f"{prefix}.mlp")]
    all_names = [f"{p}.{a}.weight" for parent, p in parents for a in _LINEAR_NAMES if hasattr(parent, a)]
    grid = _gguf_grid(model_dir, all_names) if quant == "int4" else None
    for parent, prefix in parents:
        fuse = opts.fuse and quant != "bf16"
        groups = [g for g in _FUSED_GROUPS if fuse and all(hasattr(parent, a) for a in g)]
        singles = [(a,) for a in _LINEAR_NAMES if hasattr(parent, a) and not any(a in g for g in groups)]
        for attrs in groups + singles:
            names = [f"{prefix}.{a}.weight" for a in attrs]
            weights = [getattr(parent, a).weight.data for a in attrs]
            new = _make(quant, torch.cat(weights), grid, names, opts)
            if len(attrs) == 1:
                setattr(parent, attrs[0], new)
                continue
            fused = FusedLinear(new, [w.shape[0] for w in weights])
            setattr(parent, "fused_" + "_".join(a.split("_")[0] for a in attrs), fused)
            for i, a in enumerate(attrs):
                setattr(parent, a, fused.part(i))
    if shard.is_last:
        w = shard.lm_head.weight.data
        shard.lm_head = Bf16Linear(w) if quant == "bf16" else CandidateHead(w, opts.head_topk, opts.head_bits)
    if opts.bf16_prefill:
        keep_bf16_prefill_copy(shard)
    shard.quant = quant
    shard.int4_source = "gguf-q4_1" if grid is not None else ("minmax-g32" if quant == "int4" else None)
