"""Peer anchor: llama.cpp and the testbed's shards on the same GGUF and the same cores, side by side.

Usage: nice .venv/bin/python bench/llama_anchor.py [--quants int4,int8] [--threads 2] [--repeats 5]

llama.cpp comes from llama-cpp-python, which is not a dependency of the testbed (it builds from source
here in about 10 minutes): install it with ``make bench-deps`` (``vagrant/provision.sh --with-llama-cpp``).
Every repeat runs each engine once, interleaved, so machine load affects them alike; decode is tok/s after
the first token with KV cache (a 32-token prompt, 32 new tokens, greedy), the best of the repeats.
"""

from __future__ import annotations

import testbed.omp as omp  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import json
import sys
import time

import numpy as np
import torch

from testbed.model.evaluation import text_ids
from testbed.model.generate import generate_split, load_shards
from testbed.model.loading import default_model_dir, load_tokenizer, shipped_gguf


class LlamaCpp:
    """Greedy decoding with llama.cpp through llama-cpp-python's low-level ``eval``."""

    def __init__(self, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(shipped_gguf()), n_threads=threads, n_threads_batch=threads, n_ctx=512,
            n_batch=512, verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        # without logits_all, llama-cpp-python keeps no logits of its own: read the context's last row
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))

    def generate(self, prompt: list[int], n_new: int) -> tuple[list[int], float]:
        """New tokens and the mean time per token after the first (ms)."""
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        steps: list[float] = []
        for _ in range(n_new):
            t0 = time.perf_counter()
            tok = int(np.argmax(self._last_logits()))
            out.append(tok)
            llm.eval([tok])
            steps.append(time.perf_counter() - t0)
        # the first step's time belongs to the prompt's token; the rest are decode steps
        return out, 1e3 * sum(steps[1:]) / (len(steps) - 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", default="int4,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    try:
        cpp = LlamaCpp(args.threads)
    except ImportError:
        print("SKIPPED: llama-cpp-python is not installed (`make bench-deps` builds it, ~10 min)")
        return 0
    model_dir = default_model_dir()
    prompt = text_ids(load_tokenizer(model_dir), None, args.prompt_tokens)
    engines = {q: load_shards(model_dir, [], q, args.threads) for q in ["none", *args.quants.split(",")]}
    times: dict[str, list[float]] = {name: [] for name in ["llama.cpp", *engines]}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        toks, ms = cpp.generate(prompt, args.new_tokens)
        times["llama.cpp"].append(ms)
        tokens["llama.cpp"] = toks
        for q, shards in engines.items():
            r = generate_split(shards, prompt, args.new_tokens)
            times[q].append(r.tpot_ms)
            tokens[q] = r.tokens
    anchor = 1e3 / min(times["llama.cpp"])
    print(f"threads={torch.get_num_threads()} omp={omp.in_effect()} prompt={len(prompt)} "
          f"new={args.new_tokens} repeats={args.repeats}")
    print(f"{'engine':10s} {'decode tok/s':>12s} {'median':>8s} {'/ llama.cpp':>12s} {'same tokens':>12s}")
    out = {}
    for name, ts in times.items():
        best, med = 1e3 / min(ts), 1e3 / float(np.median(ts))
        same = sum(a == b for a, b in zip(tokens[name], tokens["llama.cpp"], strict=True))
        label = "fp32" if name == "none" else name
        print(f"{label:10s} {best:12.1f} {med:8.1f} {best / anchor:12.2f} {same:>9d}/{args.new_tokens}")
        out[label] = {"decode_tok_s": best, "median_tok_s": med, "x_llama_cpp": best / anchor,
                      "tokens_same_as_llama_cpp": same}
    out["omp"] = omp.in_effect()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
