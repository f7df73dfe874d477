"""Quantized shards: bf16, int8 (8-bit codes per group of 32 inputs; per-channel as an option) and int4
(group-wise; the GGUF Q4_1 grid when there is one, with its fp16 scales kept exact).

Linear weights are replaced in place by modules that run torch's CPU weight-only kernels on bf16
activations (``_weight_int4pack_mm_for_cpu``; ``_weight_int8pack_mm`` for per-channel int8); q/k/v and
gate/up are fused into one call each; the residual stream, norms and attention stay fp32, and quantized
shards run the lean forward of :mod:`testbed.model.lean`.
For prompts (many rows) the weights are dequantized once per call and multiplied in fp32 (or, with
``bf16_prefill``, a kept bf16 copy is used), because the weight-only kernels fall behind a dense GEMM there.
The output layer scores the whole vocabulary with int4 (or int8) weights and recomputes the best
``head_topk`` candidates exactly from the fp32 embedding table, so the greedy choice rarely changes.
"""

from __future__ import annotations

import functools
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
        if isinstance(mod, _WeightOnlyLinear) and mod is not scorer and not hasattr(mod, "dense_bf16"):
            mod.register_buffer("dense_bf16", mod.dequantized().to(torch.bfloat16).contiguous())
            added += mod.dense_bf16.numel() * 2
    return added


class Bf16Linear(nn.Module):
    """bf16 weights and activations; fp32 in and out."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)

    def project(self, x2: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x2.to(torch.bfloat16), self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x).to(x.dtype)


class _WeightOnlyLinear(nn.Module):
    """A linear layer on low-precision weights: few rows (decode) through the weight-only kernel
    (``_mm``, bf16 activations), many rows (prompts) through :func:`_dense`."""

    out_features: int

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        """The kernel on rows [m, k] of any float type (run in bf16); bf16 (or fp32) out."""
        raise NotImplementedError

    def project(self, x2: torch.Tensor) -> torch.Tensor:
        """Rows [m, k] of any float type -> [m, n]: the kernel for few rows, else the dense path."""
        if x2.shape[0] >= DENSE_ROWS:
            return _dense(self, x2)
        return self._mm(x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(_rows(x))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(_WeightOnlyLinear):
    """Symmetric int8 weights with one scale per output channel and per column chunk
    (``torch._weight_int8pack_mm``; the ``channel`` layout, kept for comparison: less faithful than the
    default group layout, :class:`Int8GroupLinear`).

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
        x2 = x2.to(torch.bfloat16)
        if c == 1:
            return torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        m = x2.shape[0]
        y = torch._weight_int8pack_mm(x2.reshape(m * c, -1), self.qweight, self.scales)
        return y.view(m, c, c, n).diagonal(dim1=1, dim2=2).sum(-1, dtype=torch.float32)


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def _unpack_int4(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Codes [n, k] back from the CPU kernel's layout: blocks of ``block`` rows, each stored input by input
    as bytes that pair row ``r`` (low nibble) with row ``r + block / 2`` (high nibble)."""
    p = packed.view(n // block, k, block // 2)
    return torch.cat([p & 0x0F, p >> 4], -1).transpose(1, 2).reshape(n, k)


@functools.cache
def _int4_block_rows() -> int | None:
    """Rows per block of the packed layout (it follows the CPU's vector width); None if not recognised."""
    codes = torch.randint(0, 16, (256, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = _pack_int4(codes)
    for block in (64, 32, 16, 128, 256):
        if packed.numel() * 2 == codes.numel() and torch.equal(_unpack_int4(packed, 256, 64, block), codes):
            return block
    return None


class _Int4PackLinear(_WeightOnlyLinear):
    """Weights as planes of 4-bit codes, run by ``torch._weight_int4pack_mm_for_cpu``.

    Per group of ``group`` inputs the kernel computes ``(c - 8) * scale + zero`` (bf16 scale and zero,
    fp32 sums).  Several planes are concatenated along the input axis and the input row is repeated to
    match, so one call sums ``plane_0 + plane_1 + ...``: a second plane can carry the bf16 remainders of
    the scales (exact int4) or the low nibbles of 8-bit codes (int8).  The codes are read back from the
    packed weight for the dense prompt path; a copy is kept only where the layout is not recognised.
    """

    group: int
    n_planes: int

    def _init_planes(self, planes: list[torch.Tensor], scales_zeros: list[torch.Tensor], group: int) -> None:
        n, k = planes[0].shape
        self.out_features, self.in_features, self.group, self.n_planes = n, k, group, len(planes)
        codes = torch.cat(planes, 1).to(torch.uint8)
        self.register_buffer("packed", _pack_int4(codes))
        self.register_buffer("scales_zeros", torch.cat(scales_zeros, 0).contiguous())  # [planes*k/g, n, 2]
        block = _int4_block_rows()
        readable = block is not None and n % block == 0 and torch.equal(self._read(block), codes)
        self.register_buffer("plane_codes", None if readable else codes)

    def _read(self, block: int) -> torch.Tensor:
        return _unpack_int4(self.packed, self.out_features, self.in_features * self.n_planes, block)

    def planes(self) -> tuple[torch.Tensor, ...]:
        """The code planes, uint8 [n, k] each."""
        codes = self.plane_codes if self.plane_codes is not None else self._read(_int4_block_rows())
        return codes.split(self.in_features, dim=1)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        # one copy casts the rows to bf16 and repeats them for every plane
        m, k = x2.shape
        xb = x2.unsqueeze(1).expand(m, self.n_planes, k).to(torch.bfloat16).reshape(m, self.n_planes * k)
        return torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, self.scales_zeros)


def _kernel_sz(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The kernel's bf16 scale/zero plane [k/g, n, 2] from ``scale`` and ``zero`` [n, k/g]."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def _bf16_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as a bf16 number plus what bf16 rounded off (both as fp32)."""
    hi = x.to(torch.bfloat16).float()
    return hi, x - hi


class Int4Linear(_Int4PackLinear):
    """Asymmetric group-wise int4: ``w = d * q + m`` with codes ``q`` in 0..15, one (d, m) per 32 inputs.

    The kernel takes bf16 scales and zeros, but the GGUF's fp16 ``d`` (and ``m + 8 d``) are mostly not
    bf16 numbers, so rounding them moves every weight of the group.  With ``exact`` the codes are stored
    twice, the second plane carrying the bf16 remainders of scale and zero, so one kernel call sums both
    parts in its fp32 accumulator and the weights are the grid's to ~2^-17 (at twice the bytes per call).
    """

    def __init__(
        self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int = INT4_GROUP,
        exact: bool = False,
    ) -> None:
        super().__init__()
        self.exact = exact
        d, m = d.float().contiguous(), m.float().contiguous()
        self.register_buffer("d", d)
        self.register_buffer("m", m)
        # the kernel computes (q - 8) * scale + zero, so zero = m + 8 d
        (d_hi, d_rest), (z_hi, z_rest) = _bf16_split(d), _bf16_split(m + 8.0 * d)
        if exact:
            self._init_planes([codes, codes], [_kernel_sz(d_hi, z_hi), _kernel_sz(d_rest, z_rest)], group)
        else:
            self._init_planes([codes], [_kernel_sz(d_hi, z_hi)], group)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int = INT4_GROUP, exact: bool = False) -> Int4Linear:
        """Round a float weight to its own min/max grid per group (lossy: error reported by quant-eval)."""
        codes, d, m = quantize_int4(weight, group)
        return cls(codes, d, m, group, exact)

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        codes = self.planes()[0].view(n, k // self.group, self.group)
        return (codes.float() * self.d[..., None] + self.m[..., None]).view(n, k)


class Int8GroupLinear(_Int4PackLinear):
    """8-bit codes per weight, asymmetric, one scale and minimum per group of 32 inputs (like GGUF's 8-bit
    block formats): ``w = s * q + lo`` with ``q`` in 0..255.

    torch has no group-wise int8 kernel, so the codes run as two 4-bit planes through the int4 kernel:
    high nibbles with scale ``16 s``, low nibbles with scale ``s``, the zero split between them as a bf16
    value and its remainder; one call reads one byte per weight, as an int8 kernel would.  Group scales
    follow the weights' local range, unlike per-channel int8 (:class:`Int8Linear`), whose single scale per
    row is set by the row's largest weight.
    """

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP) -> None:
        super().__init__()
        n, k = weight.shape
        w, lo, hi = _groups(weight, group, "int8 groups")
        scale = ((hi - lo) / 255.0).clamp(min=1e-30)
        # a bf16 scale (the kernel's type), rounded up where needed so that 255 steps still span the group
        rounded = scale.to(torch.bfloat16).float()
        scale = torch.where(rounded < scale, (scale * (1 + 2**-7)).to(torch.bfloat16).float(), rounded)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 255).to(torch.uint8).view(n, k)
        self.register_buffer("scale", scale)
        self.register_buffer("lo", lo.contiguous())
        # plane sums: (high - 8) 16 s + z_high + (low - 8) s + z_low = s q - 136 s + (z_high + z_low)
        z_high, z_low = _bf16_split(lo + 136.0 * scale)
        sz = [_kernel_sz(16.0 * scale, z_high), _kernel_sz(scale, z_low)]
        self._init_planes([q >> 4, q & 0x0F], sz, group)

    def codes(self) -> torch.Tensor:
        high, low = self.planes()
        return high * 16 + low

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        q = self.codes().view(n, k // self.group, self.group).float()
        return (q * self.scale[..., None] + self.lo[..., None]).view(n, k)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes and bf16 scales over each row's full range.  (Clipping the range to
    the least squared error was tried: 96.71% top-1 against 96.93% without, on SmolLM2.)"""
    # scales are rounded to bf16 (the kernel's type) before the codes are chosen for them
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _groups(weight: torch.Tensor, group: int, what: str) -> tuple[torch.Tensor, ...]:
    """``weight`` [n, k] as [n, k / group, group], with each group's minimum and maximum."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"{what} needs the input size ({k}) to be a multiple of {group}")
    w = weight.float().view(n, k // group, group)
    return w, w.amin(dim=-1), w.amax(dim=-1)


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, ...]:
    """Codes (uint8 0..15), scales and mins per group of ``group`` inputs from a float weight."""
    n, k = weight.shape
    w, lo, hi = _groups(weight, group, "int4")
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
        scores = self.scorer._mm(x2).float()
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
    int8_layout: str = "group"  # group: 8-bit codes per 32 inputs (Int8GroupLinear); channel: Int8Linear
    int8_chunks: int = 4  # channel layout only: int8 scales per row (column chunks)
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
    if quant == "int8" and opts.int8_layout == "group":
        return Int8GroupLinear(w)
    if quant == "int8" and opts.int8_layout == "channel":
        return Int8Linear(w, opts.int8_chunks)
    if quant == "int4" and grid is not None:
        codes, d, m = (torch.cat([grid[f"{n}.{p}"] for n in names]) for p in ("q", "d", "m"))
        return Int4Linear(codes, d, m, exact=exact)
    if quant == "int4":
        return Int4Linear.from_float(w, exact=exact)
    raise ValueError(f"unknown quant {quant!r} or int8 layout {opts.int8_layout!r}")


def quantize_shard(shard, quant: str, model_dir: Path | None, opts: QuantOptions | None = None) -> None:
    """Replace the shard's linear layers (and output layer) by ``quant`` versions, in place.

    ``model_dir``: where int4 looks for the GGUF's own Q4_1 grid (None: group-wise min/max int4)."""
    opts = opts or QuantOptions()
    if quant not in ("bf16", "int8", "int4"):
        raise ValueError(f"unknown quant {quant!r}")
    parents: list[tuple[nn.Module, str]] = []  # (module, checkpoint prefix)
    for local, layer in enumerate(shard.layers):
        prefix = f"model.layers.{shard.start + local}"
        parents += [(layer.self_attn, f"{prefix}.self_attn"), (layer.mlp, f"{prefix}.mlp")]
    all_names = [f"{p}.{a}.weight" for parent, p in parents for a in _LINEAR_NAMES if hasattr(parent, a)]
    grid = _gguf_grid(model_dir, all_names) if quant == "int4" and model_dir is not None else None
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
    shard.lean = True
    shard.int4_source = "gguf-q4_1" if grid is not None else ("minmax-g32" if quant == "int4" else None)
