"""Token-latency statistics: percentiles over every token of a point, not over per-session means."""

from __future__ import annotations

import pytest

from testbed.experiments.metrics import combine, latency_stats, pooled_token_latency, session_metrics


def session(token_ms: list[float]) -> dict:
    """A driver result with one TTFT step and the given decode steps, no network."""
    return {"token_ms": token_ms, "tokens": list(range(len(token_ms))), "prompt_tokens": 5,
            "total_ms": sum(token_ms), "per_hop": [{"compute_ms": sum(token_ms), "codec_ms": 0.0}]}


def test_stats_of_0_to_100():
    s = latency_stats([float(x) for x in range(101)])
    assert (s["n"], s["p50"], s["p95"], s["p99"], s["max"], s["mean"]) == (101, 50, 95, 99, 100, 50)
    assert latency_stats([])["p99"] is None and latency_stats([])["n"] == 0


def test_combine_pools_the_tokens_of_every_session():
    # device A: 4 decode steps of 10 ms; device B: 6 of 30 ms (the first step, 500 ms, is the TTFT)
    a, b = [500.0] + [10.0] * 4, [500.0] + [30.0] * 6
    out = combine([session_metrics(session(a)), session_metrics(session(b))], [a, b])
    lat = out["token_latency_ms"]
    # pooled: 10 10 10 10 30 30 30 30 30 30 -> median (30 + 30) / 2, mean 220 / 10;
    # the median of the two session means would be 20, a latency no token had
    assert lat["n"] == 10 and lat["p50"] == 30 and lat["mean"] == 22 and lat["p95"] == 30
    assert out["session_mean_token_ms"] == [10, 30]
    assert out["tokens"] == 5 + 7 and out["ttft_ms"] == 500


def test_combine_of_one_session_keeps_its_figures():
    t = [200.0, 10.0, 20.0, 30.0, 40.0]
    m = session_metrics(session(t))
    out = combine([m], [t])
    assert out["token_latency_ms"] == m["token_latency_ms"]
    assert out["token_latency_ms"]["p50"] == 25 and out["session_mean_token_ms"] == [25]


def test_combine_needs_one_token_list_per_session():
    m = session_metrics(session([1.0, 2.0]))
    with pytest.raises(ValueError, match="2 sessions but 1"):
        combine([m, m], [[1.0, 2.0]])


def test_pooled_over_repeats_and_sessions():
    # 0..100 ms spread over two repeats, the second with two sessions; each list leads with a TTFT
    # (1000 ms) that the per-token statistics leave out
    first = {"sessions": [{"raw": {"token_ms": [1000.0] + [float(x) for x in range(0, 40)]}}]}
    second = {"sessions": [{"raw": {"token_ms": [1000.0] + [float(x) for x in range(40, 90)]}},
                           {"raw": {"token_ms": [1000.0] + [float(x) for x in range(90, 101)]}}]}
    s = pooled_token_latency([first, second])
    assert (s["n"], s["p50"], s["p95"], s["p99"], s["max"]) == (101, 50, 95, 99, 100)
    assert pooled_token_latency([])["n"] == 0
