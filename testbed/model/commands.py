"""``testbed generate`` and ``testbed quant-eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from testbed import omp
from testbed.spec.errors import SpecError


def _threads_in_use() -> int:
    import torch

    return torch.get_num_threads()


def _cuts(args: argparse.Namespace, n_layers: int) -> list[int]:
    from testbed.model.shard import parse_cuts, split_points

    try:
        cuts = parse_cuts(args.cuts or "")
        split_points(cuts, n_layers)
    except ValueError as e:
        raise SpecError("--cuts", "cuts", str(e)) from None
    return cuts


def _model_dir(args: argparse.Namespace) -> Path:
    from testbed.model.loading import prepare_model_dir

    try:
        return prepare_model_dir(args.model)
    except SpecError:  # already names the model and the problem
        raise
    except FileNotFoundError as e:
        raise SpecError(args.model or "--model", "model", str(e)) from None


def generate(args: argparse.Namespace) -> int:
    """Run all shards in one process and print the reply (JSON with --json)."""
    from testbed.model.generate import generate_split, load_shards
    from testbed.model.loading import eos_ids, format_prompt, load_tokenizer
    from testbed.model.shard import load_config

    if args.max_new_tokens < 1:
        raise SpecError("--max-new-tokens", "max_new_tokens", "must be at least 1")
    model_dir = _model_dir(args)
    config = load_config(model_dir)
    cuts = _cuts(args, config.num_hidden_layers)
    tok = load_tokenizer(model_dir)
    adapter = getattr(args, "adapter", None)
    if adapter is not None:
        from testbed.model.adapter import check_adapter

        check_adapter(adapter, model_dir)
    shards = load_shards(model_dir, cuts, args.quant, adapter=adapter)
    res = generate_split(
        shards, format_prompt(tok, args.prompt), args.max_new_tokens, kv_cache=not args.no_kv_cache,
        codec=args.codec, eos_ids=eos_ids(tok, config),
    )
    text = tok.decode(res.tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({
            "text": text, "tokens": res.tokens, "ttft_ms": round(res.ttft_ms, 3),
            "tpot_ms": round(res.tpot_ms, 3), "quant": args.quant, "codec": args.codec,
            "cuts": cuts, "kv_cache": res.kv_cache, "prompt_tokens": res.prompt_tokens, "adapter": adapter,
            "per_shard_ms": [round(x, 3) for x in res.per_shard_ms], "wire_bytes": res.wire_bytes,
            "omp": omp.in_effect(), "thread_plan": omp.summary(_threads_in_use()),
        }))
    else:
        print(text)
        print(f"[{len(res.tokens)} tokens, TTFT {res.ttft_ms:.1f} ms, TPOT {res.tpot_ms:.1f} ms]")
    return 0


def quant_eval(args: argparse.Namespace) -> int:
    """Agreement and speed of a quantized model against fp32 on a text."""
    from testbed.model.evaluation import quant_eval as run
    from testbed.model.shard import load_config

    model_dir = _model_dir(args)
    cuts = _cuts(args, load_config(model_dir).num_hidden_layers)
    text = Path(args.text) if args.text else None
    if text is not None and not text.is_file():
        raise SpecError(args.text, "text", "no such file")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise SpecError("--max-tokens", "max_tokens", "must be at least 2")
    try:
        out = run(model_dir, args.quant, text, cuts, args.max_tokens)
    except UnicodeDecodeError as e:
        raise SpecError(args.text, "text", f"not UTF-8 text ({e.reason})") from None
    except ValueError as e:
        raise SpecError(args.text or "text", "text", str(e)) from None
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:20s} {v:.4f}" if isinstance(v, float) else f"{k:20s} {v}")
    return 0
