"""The device program: tokenize, run the first shard, drive generation, print one JSON line.

    python nodes/driver.py --model DIR --layers 0:E --hops 0:8,8:30 [--next tcp://IP:PORT] \
        --prompt P [--max-new-tokens N] [--codec C] [--quant Q] [--no-kv-cache] [--threads 2]

``--prompt-ids 1,2,3`` skips the chat template and sends these ids as they are.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", required=True)
    ap.add_argument("--hops", default="", help="layers of every hop, the device's first (for the report)")
    ap.add_argument("--next", default=None)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--prompt-ids", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--no-kv-cache", action="store_true")
    ap.add_argument("--no-stop", action="store_true", help="do not stop at end-of-sequence tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)

    import torch

    from testbed.apps.inference.split_client import SplitClient, SplitError
    from testbed.model.loading import eos_ids, format_prompt, load_tokenizer
    from testbed.model.shard import Shard

    threads = max(1, min(2, args.threads))
    torch.set_num_threads(threads)
    start, end = (int(v) for v in args.layers.split(":"))
    shard = None  # --layers 0:0: no layer on the device, token ids go upstream
    if end > start:
        shard = Shard.load(args.model, start, end, quant=args.quant, threads=threads)
        shard.eval()
    tok = load_tokenizer(args.model)
    if args.prompt_ids:
        ids = torch.tensor([[int(v) for v in args.prompt_ids.split(",")]], dtype=torch.int64)
    else:
        ids = torch.as_tensor(format_prompt(tok, args.prompt or ""), dtype=torch.int64).reshape(1, -1)
    stop = set() if args.no_stop else eos_ids(tok, shard.config if shard else None)
    client = SplitClient(shard, args.next, codec=args.codec, kv_cache=not args.no_kv_cache,
                         timeout_s=args.timeout, layers=[h for h in args.hops.split(",") if h])
    try:
        client.connect()
        out = client.generate(ids, args.max_new_tokens, stop)
    except SplitError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    finally:
        client.close()
    out["text"] = tok.decode([t for t in out["tokens"] if t not in stop], skip_special_tokens=True)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
