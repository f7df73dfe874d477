"""Metrics of split-inference results: one device session, one record, one point.

Per-token latency statistics use the decode steps (every step after the first,
whose latency is the TTFT); with a single generated token they fall back to it.
Percentiles are taken over the pooled token latencies (every session of a
record, every repeat of a point), never over per-session means: a mean of
means hides the slow tokens that p95/p99 are meant to show.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def decode_ms(token_ms: list[float]) -> list[float]:
    """The decode-step latencies of one session's ``token_ms`` (the first step is the TTFT)."""
    values = [float(x) for x in token_ms or []]
    return values[1:] if len(values) > 1 else values


def latency_stats(values: list[float]) -> dict[str, Any]:
    """Mean, percentiles (linear interpolation) and max of token latencies; ``n``: how many."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "mean": _r(a.mean()), "p50": _r(p50), "p95": _r(p95), "p99": _r(p99),
            "max": _r(a.max())}


def pooled_token_latency(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-latency statistics of a point: the decode steps of every session of every record pooled."""
    pooled: list[float] = []
    for rec in records:
        for s in rec.get("sessions") or []:
            pooled += decode_ms((s.get("raw") or {}).get("token_ms") or [])
    return latency_stats(pooled)


def positions_sent(prompt_tokens: int, tokens: int, kv_cache: bool) -> int:
    """Token positions a hop receives over a request: with the KV cache the prompt once and then one
    per step; without it the whole sequence at every step."""
    if kv_cache:
        return prompt_tokens + max(0, tokens - 1)
    return sum(prompt_tokens + i for i in range(tokens))


def session_metrics(result: dict[str, Any], kv_cache: bool = True) -> dict[str, Any]:
    """Metrics of one session's result (the dict ``run_split_inference`` returns)."""
    token_ms = [float(x) for x in result.get("token_ms") or []]
    tokens = len(result.get("tokens") or token_ms)
    sent = positions_sent(int(result.get("prompt_tokens") or 0), tokens, kv_cache)
    decode = decode_ms(token_ms)
    e2e = float(result.get("total_ms") or sum(token_ms))
    per_hop = result.get("per_hop") or []
    bytes_up = int(result.get("bytes_up") or 0)
    bytes_down = int(result.get("bytes_down") or 0)
    hops = []
    for i, h in enumerate(per_hop):
        hop = {
            "layers": h.get("layers"),
            "compute_ms": _r(h.get("compute_ms", 0.0)),
            "codec_ms": _r(h.get("codec_ms", 0.0)),
            "compute_ms_per_token": _r((h.get("compute_ms", 0.0) + h.get("codec_ms", 0.0)) / tokens)
            if tokens else None,
        }
        if i > 0:
            hop.update(
                transfer_ms=_r(h.get("transfer_ms", 0.0)),
                bytes_up=int(h.get("bytes_up", 0)),
                bytes_down=int(h.get("bytes_down", 0)),
                payload_up=h.get("payload_up"),
                bytes_up_per_token=_r(h.get("bytes_up", 0) / tokens, 1) if tokens else None,
                bytes_down_per_token=_r(h.get("bytes_down", 0) / tokens, 1) if tokens else None,
                payload_per_position=_r((h.get("payload_up") or 0) / sent, 2) if sent else None,
            )
        for key in ("kv_cache_bytes", "cpu_ms", "node"):
            if key in h:
                hop[key] = h[key]
        hops.append(hop)
    return {
        "tokens": tokens,
        "prompt_tokens": result.get("prompt_tokens"),
        "ttft_ms": _r(result.get("ttft_ms", token_ms[0] if token_ms else None)),
        "token_latency_ms": latency_stats(decode),
        "e2e_ms": _r(e2e),
        "tokens_per_s": _r(tokens / (e2e / 1e3)) if e2e > 0 else None,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_up_per_token": _r(bytes_up / tokens, 1) if tokens else None,
        "bytes_down_per_token": _r(bytes_down / tokens, 1) if tokens else None,
        "positions_sent": sent,
        "payload_up_per_position": hops[1]["payload_per_position"] if len(hops) > 1 else None,
        "per_hop": hops,
        "compute_ms": _r(sum((h.get("compute_ms", 0.0) + h.get("codec_ms", 0.0)) for h in per_hop)),
        "transfer_ms": _r(sum(h.get("transfer_ms", 0.0) for h in per_hop[1:])),
    }


def combine(sessions: list[dict[str, Any]], token_ms: list[list[float]]) -> dict[str, Any]:
    """Metrics of one record: parallel sessions' metrics (``session_metrics``) and their ``token_ms``.

    The first session's fields, with aggregate figures: token counts and bytes summed, the
    end-to-end time of the slowest session, TTFT averaged over sessions, and token-latency
    statistics over every session's decode steps pooled.  ``session_mean_token_ms`` keeps each
    session's own mean (per device: who was served worse).
    """
    if len(sessions) != len(token_ms):
        raise ValueError(f"{len(sessions)} sessions but {len(token_ms)} token-latency lists")
    out = dict(sessions[0])
    tokens = sum(s["tokens"] for s in sessions)
    e2e = max(s["e2e_ms"] or 0.0 for s in sessions)
    ttft = [s["ttft_ms"] for s in sessions if s["ttft_ms"] is not None]
    out.update(
        tokens=tokens,
        e2e_ms=_r(e2e),
        tokens_per_s=_r(tokens / (e2e / 1e3)) if e2e else None,
        ttft_ms=_r(float(np.mean(ttft))) if ttft else None,
        token_latency_ms=latency_stats([x for t in token_ms for x in decode_ms(t)]),
        session_mean_token_ms=[s["token_latency_ms"]["mean"] for s in sessions],
        bytes_up=sum(s["bytes_up"] for s in sessions),
        bytes_down=sum(s["bytes_down"] for s in sessions),
    )
    return out
