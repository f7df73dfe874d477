"""The two inference node programs, as functions of their settings (``nodes/*.py`` call them).

- :func:`shard_node`: load layers ``start:end``, serve them over ZeroMQ, relay to the next hop;
  prints its ready line once the shard is loaded and the socket bound; SIGTERM/SIGINT end it cleanly.
- :func:`driver`: the device: tokenize, run its own layers, drive greedy generation through the
  chain; prints its ready line once the next hop answered (its CPU clock starts there), then one
  JSON line with the measurements (or ``{"error": ...}`` and exit code 1).
"""

from __future__ import annotations

import json
import signal

from testbed.apps.inference.settings import DriverSettings, ShardSettings
from testbed.apps.launch import announce_ready
from testbed.wire import security


def shard_node(s: ShardSettings) -> int:
    import torch

    from testbed.apps.inference.shard_server import ShardServer
    from testbed.model.shard import Shard

    torch.set_num_threads(s.threads)
    shard = Shard.load(s.model, s.start, s.end, quant=s.quant, threads=s.threads, adapter=s.adapter)
    shard.eval()
    if s.warmup:
        with torch.inference_mode():
            shard.forward(torch.zeros((1, 1), dtype=torch.int64) if shard.is_first
                          else torch.zeros((1, 1, shard.hidden_size)), shard.new_cache(), 0)
    budget = None if s.kv_budget_mb is None else s.kv_budget_mb << 20
    server = ShardServer(shard, s.bind, s.next, idle_timeout=s.idle_timeout_s,
                         next_standbys=list(s.next_standbys), kv_budget_bytes=budget, kv_int8=s.kv_int8,
                         ctx=security.context(s.curve_keys))

    def stop(_sig: int, _frame: object) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    lora = f" adapter={s.adapter} merged={shard.adapter_layers}" if s.adapter else ""
    announce_ready(f"{s.bind} layers={s.start}:{s.end} threads={s.threads}{lora}")
    try:
        server.serve()
    finally:
        server.close()
    return 0


def driver(s: DriverSettings) -> int:
    import torch

    from testbed.apps.inference.split_client import SplitClient, SplitError
    from testbed.model.loading import eos_ids, format_prompt, load_tokenizer
    from testbed.model.shard import Shard

    torch.set_num_threads(s.threads)
    shard = None  # 0:0: no layer on the device, token ids go upstream
    if s.end > s.start:
        shard = Shard.load(s.model, s.start, s.end, quant=s.quant, threads=s.threads, adapter=s.adapter)
        shard.eval()
    tok = load_tokenizer(s.model)
    if s.prompt_ids is not None:
        ids = torch.tensor([s.prompt_ids], dtype=torch.int64)
    else:
        ids = torch.as_tensor(format_prompt(tok, s.prompt), dtype=torch.int64).reshape(1, -1)
    stop = eos_ids(tok, shard.config if shard else None) if s.stop_at_eos else set()
    client = SplitClient(shard, s.next, codec=s.codec, kv_cache=s.kv_cache, timeout_s=s.timeout_s,
                         layers=list(s.hops), next_standbys=list(s.next_standbys),
                         routes=[list(r) for r in s.routes], floor_ms=s.detect_floor_ms,
                         ctx=security.context(s.curve_keys))
    client.listen_for_handovers()  # the run's handover signals (split_client, recovery.handover_signal)
    try:
        try:
            client.connect()
            lora = f" adapter={s.adapter} merged={shard.adapter_layers if shard else []}" if s.adapter else ""
            announce_ready(f"next={s.next} layers={s.start}:{s.end} threads={s.threads}{lora}")
            out = client.generate(ids, s.max_new_tokens, stop)
        except SplitError as e:  # the record so far goes with the error
            print(json.dumps({"error": str(e), **getattr(client, "partial", {})}), flush=True)
            return 1
        out["text"] = tok.decode([t for t in out["tokens"] if t not in stop], skip_special_tokens=True)
        # before the CLOSE round trip: the time this line is read marks the end of generation
        print(json.dumps(out), flush=True)
        return 0
    finally:
        client.close()
