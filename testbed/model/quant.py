"""Quantized shards: bf16, int8 (per-channel) and int4 (group-wise; the GGUF Q4_1 grid when there is one).

Linear weights are replaced in place by modules that run torch's CPU weight-only kernels on bf16
activations (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``); the residual stream, norms and
attention stay fp32.
For prompts (many rows) the weights are dequantized once per call and multiplied in fp32, because the
weight-only kernels are tuned for few rows and fall behind a dense fp32 GEMM there.
The output layer scores the whole vocabulary with int8 weights and recomputes the best ``TOPK`` candidates
exactly from the fp32 embedding table, so the greedy choice rarely changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

INT4_GROUP = 32
TOPK = 16
DENSE_ROWS = 32  # from this many rows on, dequantize and use a dense fp32 GEMM


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class Bf16Linear(nn.Module):
    """bf16 weights and activations; fp32 in and out."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


class Int8Linear(nn.Module):
    """Symmetric per-output-channel int8 weights."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale = quantize_int8(weight.float())
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scale)
        self.out_features, self.in_features = q.shape

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        if x2.shape[0] >= DENSE_ROWS:
            y = nn.functional.linear(x2.float(), self.dequantized())
        else:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """Asymmetric group-wise int4: ``w = d * q + m`` with codes ``q`` in 0..15, one (d, m) per 32 inputs."""

    def __init__(
        self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int = INT4_GROUP
    ) -> None:
        super().__init__()
        n, k = codes.shape
        self.out_features, self.in_features, self.group = n, k, group
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2))
        # the codes again, two per byte, for the dense prompt path (cheap to unpack, unlike the kernel layout)
        c = codes.to(torch.uint8)
        self.register_buffer("nibbles", (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous())
        self.register_buffer("d", d.float().contiguous())
        self.register_buffer("m", m.float().contiguous())
        # the kernel computes (q - 8) * scale + zero, so zero = m + 8 d
        d, m = d.float(), m.float()
        sz = torch.stack([d, m + 8.0 * d], dim=-1).transpose(0, 1).contiguous()  # [k/group, n, 2]
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16))

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int = INT4_GROUP) -> Int4Linear:
        """Round a float weight to its own min/max grid per group (lossy: error reported by quant-eval)."""
        codes, d, m = quantize_int4(weight, group)
        return cls(codes, d, m, group)

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        codes = torch.stack([self.nibbles & 0x0F, self.nibbles >> 4], dim=-1)
        codes = codes.view(n, k // self.group, self.group)
        return (codes.float() * self.d[..., None] + self.m[..., None]).view(n, k)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        if x2.shape[0] >= DENSE_ROWS:
            y = nn.functional.linear(x2.float(), self.dequantized())
        else:
            y = self._mm(x2.to(torch.bfloat16))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


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
    """Output layer: int8 scores for the whole vocabulary, the top ``k`` recomputed exactly in fp32."""

    def __init__(self, weight: torch.Tensor, k: int = TOPK) -> None:
        super().__init__()
        self.scorer = Int8Linear(weight)
        self.register_buffer("table", weight.float().contiguous())
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x).float()
        scores = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.scorer.qweight, self.scorer.scales)
        scores = scores.float()
        idx = scores.topk(self.k, dim=-1).indices  # [rows, k]
        exact = torch.einsum("rh,rkh->rk", x2, self.table[idx])
        scores.scatter_(-1, idx, exact)
        return scores.reshape(*x.shape[:-1], -1)


_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def quantize_shard(shard, quant: str, model_dir: Path) -> None:
    """Replace the shard's linear layers (and output layer) by ``quant`` versions, in place."""
    linears: list[tuple[nn.Module, str, str]] = []  # (parent, attribute, checkpoint name)
    for local, layer in enumerate(shard.layers):
        prefix = f"model.layers.{shard.start + local}"
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for attr in _LINEAR_NAMES:
                if hasattr(parent, attr):
                    linears.append((parent, attr, f"{prefix}.{parent_name}.{attr}.weight"))
    grid = _gguf_grid(model_dir, [n for _, _, n in linears]) if quant == "int4" else None
    for parent, attr, name in linears:
        w = getattr(parent, attr).weight.data
        if quant == "bf16":
            new: nn.Module = Bf16Linear(w)
        elif quant == "int8":
            new = Int8Linear(w)
        elif quant == "int4" and grid is not None:
            new = Int4Linear(grid[f"{name}.q"], grid[f"{name}.d"], grid[f"{name}.m"])
        elif quant == "int4":
            new = Int4Linear.from_float(w)
        else:
            raise ValueError(f"unknown quant {quant!r}")
        setattr(parent, attr, new)
    if shard.is_last:
        w = shard.lm_head.weight.data
        shard.lm_head = Bf16Linear(w) if quant == "bf16" else CandidateHead(w)
    shard.quant = quant
    shard.int4_source = "gguf-q4_1" if grid is not None else ("minmax-g32" if quant == "int4" else None)
