"""``testbed generate`` / ``testbed quant-eval`` end to end on the tiny model (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from testbed import omp

OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "TESTBED_OMP", "TESTBED_THREADS")


def _testbed(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    return subprocess.run(
        [sys.executable, "-m", "testbed", *args], capture_output=True, text=True, timeout=300,
        env={**base, **env},
    )


@pytest.mark.slow
def test_generate_json(tiny_dir) -> None:
    p = _testbed("generate", "--model", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "5",
                 "--cuts", "1,3", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert {"text", "tokens", "ttft_ms", "tpot_ms", "quant", "codec"} <= set(out)
    assert 1 <= len(out["tokens"]) <= 5 and out["ttft_ms"] > 0
    # the same prompt without KV cache and another cut gives the same tokens
    q = _testbed("generate", "--model", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "5",
                 "--cuts", "2", "--no-kv-cache", "--json")
    assert json.loads(q.stdout)["tokens"] == out["tokens"]
    # which thread plan ran, and why
    plan = out["thread_plan"]
    assert plan["threads"] >= 1 and plan["wait"] == out["omp"] in omp.POLICIES and "->" in plan["why"]


@pytest.mark.slow
def test_generate_follows_the_users_thread_settings(tiny_dir) -> None:
    """OMP_NUM_THREADS and TESTBED_OMP set by the user win over the plan, and the JSON says so."""
    p = _testbed("generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2", "--json",
                 OMP_NUM_THREADS="1", TESTBED_OMP="spin")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)["thread_plan"]
    assert plan == {"threads": 1, "wait": "spin", "why": "OMP_NUM_THREADS=1, TESTBED_OMP=spin"}


@pytest.mark.slow
def test_quant_eval_json(tiny_dir, tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the phone sends hidden states to the edge server. " * 20)
    p = _testbed("quant-eval", "--model", str(tiny_dir), "--quant", "int8", "--text", str(text),
                 "--max-tokens", "120", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for k in ("quant", "top1_agreement", "max_logit_diff", "mean_logit_diff", "decode_tok_s",
              "decode_tok_s_fp32", "prefill_tok_s", "prefill_tok_s_fp32", "weight_bytes"):
        assert k in out
    assert out["quant"] == "int8" and 0.5 <= out["top1_agreement"] <= 1.0
    assert out["decode_tok_s"] > 0 and out["weight_bytes"] > 0
    assert out["thread_plan"]["threads"] >= 1 and out["thread_plan"]["wait"] in omp.POLICIES


def test_bad_input_is_one_line_exit_2(tiny_dir, tmp_path) -> None:
    p = _testbed("generate", "--model", str(tiny_dir), "--prompt", "x", "--cuts", "9")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "cuts" in p.stderr
    p = _testbed("quant-eval", "--model", str(tiny_dir), "--quant", "int4", "--text", str(tmp_path / "no"))
    assert p.returncode == 2 and "no such file" in p.stderr
    p = _testbed("generate", "--model", str(tmp_path / "nothing"), "--prompt", "x")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
