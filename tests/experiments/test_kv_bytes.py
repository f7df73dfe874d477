"""The KV-cache size recorded per shard equals what a real shard's cache holds."""

from __future__ import annotations

import torch

from testbed.experiments.runner import kv_cache_bytes, model_info
from testbed.model.shard import Shard
from testbed.model.tiny import make_tiny_model_dir


def test_kv_cache_bytes_match_a_real_shard(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny", n_layers=3)
    info = model_info(model)
    for start, end in ((0, 1), (1, 3), (0, 3)):
        shard = Shard.load(model, start, end)
        cache = shard.new_cache()
        x = torch.arange(12).reshape(1, -1) if shard.is_first else torch.randn(1, 12, info["hidden"])
        shard.forward(x, cache, 0)
        step = torch.tensor([[5]]) if shard.is_first else torch.randn(1, 1, info["hidden"])
        shard.forward(step, cache, 12)
        assert shard.cache_bytes(cache) == kv_cache_bytes(info, start, end, 13) > 0
