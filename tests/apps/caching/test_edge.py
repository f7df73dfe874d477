"""An edge's request path end to end on loopback: fetch a model's missing blocks from the repository
(delivery protocol), store them, load the base and LoRA adapters from the stored blocks, serve a mixed
batch whose tokens equal the merged models'; then one real SmolLM2 adapter fetched and served."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.caching.blocks import BlockDir, encode_tensor
from testbed.apps.caching.catalogue import BlockRef, Manifest, peft_config, write_model_dir
from testbed.apps.caching.delivery import BlockFetcher, BlockServer
from testbed.apps.caching.edge import EdgeServer
from testbed.apps.caching.serving import (
    BASE,
    AdapterServer,
    Request,
    greedy,
    load_base,
    lora_config,
    merged_model,
    random_adapter_state,
)
from testbed.apps.caching.store import EdgeStore

TOKENS = 8


def repository(blocks: BlockDir, **kw) -> BlockServer:
    return BlockServer("tcp://127.0.0.1:*", lambda h: blocks.get(h) if blocks.has(h) else None, **kw)


def test_edge_fetches_loads_and_serves_tiny_catalogue_models(tiny_catalogue, tmp_path: Path):
    from peft import LoraConfig

    cat = tiny_catalogue
    base = cat.models["tiny"]
    loras = [m for m in cat.models.values() if m.kind == "lora" and m.base == "tiny"][:2]
    store = EdgeStore(tmp_path / "edge", capacity_bytes=4 * base.bytes)
    with repository(cat.blocks) as repo, \
            BlockFetcher(repo.endpoint, store.put, chunk_bytes=4096) as fetcher:
        # the base first: over the wire into the store, then into memory from the stored blocks
        first = EdgeServer(store, None, "tiny").missing(base)
        assert first and len(first) == len(base.hashes())
        rep = fetcher.fetch(first)
        assert rep.bytes == base.bytes and rep.corrupt_chunks == 0
        model = load_base(write_model_dir(base, store.get, tmp_path / "base"))
        edge = EdgeServer(store, AdapterServer(model), "tiny")
        got = [edge.ensure(m, fetcher) for m in loras]
        again = edge.ensure(loras[0], fetcher)
    # an adapter moves only its own blocks: the base's are already here
    for m, g in zip(loras, got, strict=True):
        own = sum({b.hash: b.bytes for b in m.blocks if b.part == "adapter"}.values())
        assert not g.hit and g.fetched_bytes == own < base.bytes / 4
    assert again.hit and again.fetched_bytes == 0
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    reqs = [Request(loras[0].name, prompts[0]), Request(loras[1].name, prompts[1]), Request(BASE, prompts[2])]
    res = edge.serve(reqs, TOKENS)
    for r, toks in zip(reqs, res.tokens, strict=True):
        ref_base = load_base(tmp_path / "base")
        if r.adapter == BASE:
            ref = ref_base
        else:
            m = cat.models[r.adapter]
            state = {b.name: cat.blocks.get(b.hash) for b in m.blocks if b.part == "adapter"}
            from testbed.apps.caching.blocks import decode_tensor

            ref = merged_model(ref_base, LoraConfig(**m.details["peft_config"]),
                               {k: decode_tensor(v) for k, v in state.items()})
        assert toks == greedy(ref, r.prompt_ids, TOKENS)


@pytest.mark.slow
@pytest.mark.model
def test_real_smollm2_adapter_fetched_and_served(tmp_path: Path):
    from peft import LoraConfig

    from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer

    model_dir = default_model_dir()
    server = AdapterServer(load_base(model_dir))
    # the repository: one generated SmolLM2 adapter (rank 8 on q/v) as blocks, and its manifest
    targets = ("q_proj", "v_proj")
    cfg_dict = peft_config("smollm2-135m", 8, targets)
    state = random_adapter_state(server.shapes, lora_config(8, 16, targets), seed=7, std=0.1)
    repo_blocks = BlockDir(tmp_path / "repo")
    refs = []
    for name in sorted(state):
        h, n = repo_blocks.put_file(encode_tensor(state[name]))
        refs.append(BlockRef(name, h, n, "tensor", "adapter"))
    manifest = Manifest("lora-smol", "lora", "smollm2-135m", "fp32", True, 7, refs,
                        {"peft_config": cfg_dict})
    edge = EdgeServer(EdgeStore(tmp_path / "edge", 64 << 20), server, "smollm2-135m")
    with repository(repo_blocks) as repo, BlockFetcher(repo.endpoint, edge.store.put) as fetcher:
        got = edge.ensure(manifest, fetcher)
    assert got.fetched_bytes == manifest.bytes and got.report.chunks >= len(refs)
    tok = load_tokenizer(model_dir)
    prompt = format_prompt(tok, "What is the capital of France?")
    res = edge.serve([Request("lora-smol", prompt), Request(BASE, prompt)], TOKENS)
    merged = merged_model(load_base(model_dir), LoraConfig(**cfg_dict), state)
    assert res.tokens[0] == greedy(merged, prompt, TOKENS)
    assert res.tokens[0] != res.tokens[1]  # the adapter changes what the model says
