"""Per-session KV caches of a shard node: an optional int8 store and the LRU memory budget.

``Int8Layer`` keeps keys and values as int8 with one float32 scale per head and position
(absmax over the head dimension), so a new token never rescales the tokens before it; attention
reads a dequantized copy.  With SmolLM2's head dimension of 64 that is 1 + 4/64 bytes per value
instead of 4 (fp32): about 3.8x less memory, at an agreement cost measured in bench/kv_budget.py.

``KvBudget`` holds the sessions of one node in least-recently-used order and evicts the oldest
ones whenever their caches together exceed the node's ``kv_budget_mb``; the client then rebuilds
an evicted session by re-prefilling it from its token history (``Kind.EVICTED``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

MAX_REMEMBERED = 4096  # evicted session ids kept to answer EVICTED rather than "unknown session"


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale.float()


class Int8Layer(DynamicLayer):
    """A DynamicLayer whose ``keys``/``values`` are int8; ``k_scale``/``v_scale`` per head and position."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        self.keys = self.values = None
        self.k_scale = self.v_scale = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kq, ks = _quantize(key_states)
        vq, vs = _quantize(value_states)
        if self.keys is None:
            self.keys, self.values, self.k_scale, self.v_scale = kq, vq, ks, vs
        else:
            self.keys = torch.cat([self.keys, kq], dim=-2)
            self.values = torch.cat([self.values, vq], dim=-2)
            self.k_scale = torch.cat([self.k_scale, ks], dim=-2)
            self.v_scale = torch.cat([self.v_scale, vs], dim=-2)
        return (self.keys.to(self.dtype) * self.k_scale).to(self.dtype), \
            (self.values.to(self.dtype) * self.v_scale).to(self.dtype)

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized or self.keys is None else int(self.keys.shape[-2])

    def reset(self) -> None:
        self.k_scale = self.v_scale = None
        super().reset()


def new_int8_cache() -> Cache:
    return Cache(layer_class_to_replicate=Int8Layer)


def cache_bytes(cache: Any) -> int:
    """Bytes a cache holds: keys, values and (int8) their scales."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values", "k_scale", "v_scale"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@dataclass
class Entry:
    cache: Any
    next_pos: int = 0
    last_used: float = 0.0
    nbytes: int = 0


@dataclass
class KvBudget:
    """Sessions of one node in LRU order (oldest first), with the counts a run reports."""

    budget_bytes: int | None = None  # None: unlimited
    sessions: OrderedDict[int, Entry] = field(default_factory=OrderedDict)
    evicted_ids: OrderedDict[int, None] = field(default_factory=OrderedDict)
    hits: int = 0  # requests that found their session's cache here
    evictions: int = 0  # sessions dropped to stay within the budget
    rebuilds: int = 0  # sessions prefilled again after an eviction (or idle expiry)

    def get(self, sid: int) -> Entry | None:
        entry = self.sessions.get(sid)
        if entry is not None:
            self.sessions.move_to_end(sid)
        return entry

    def start(self, sid: int, cache: Any, now: float) -> Entry:
        """A session (re)starting at position 0; counts a rebuild if it was dropped here before."""
        if self.evicted_ids.pop(sid, "absent") is None:
            self.rebuilds += 1
        self.sessions.pop(sid, None)
        entry = self.sessions[sid] = Entry(cache, 0, now)
        return entry

    def was_dropped(self, sid: int) -> bool:
        return sid in self.evicted_ids

    def drop(self, sid: int, remember: bool) -> None:
        """Forget a session: closed (``remember`` False) or dropped (evicted, idle-expired)."""
        self.sessions.pop(sid, None)
        if remember:
            self.evicted_ids[sid] = None
            while len(self.evicted_ids) > MAX_REMEMBERED:
                self.evicted_ids.popitem(last=False)
        else:
            self.evicted_ids.pop(sid, None)

    def total(self) -> int:
        return sum(e.nbytes for e in self.sessions.values())

    def enforce(self, keep: int, measure: Callable[[Any], int]) -> int:
        """Evict least recently used sessions (never ``keep``) until within the budget; returns how many."""
        entry = self.sessions.get(keep)
        if entry is not None:
            entry.nbytes = measure(entry.cache)
        if self.budget_bytes is None:
            return 0
        n = 0
        total = self.total()
        for sid in list(self.sessions):
            if total <= self.budget_bytes:
                break
            if sid == keep:
                continue
            total -= self.sessions[sid].nbytes
            self.drop(sid, remember=True)
            n += 1
        self.evictions += n
        return n
