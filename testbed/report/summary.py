"""The Markdown summary of a results directory: headline, environment, one table row per point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.report.data import SPREAD_SHORT, Row, Spread
from testbed.report.plots import crossovers


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def cell(sp: Spread | None, nd: int = 1) -> str:
    """``median (min–max)``; the median alone when the repeats agree or there is one."""
    if sp is None:
        return "-"
    lo, hi = _f(sp.lo, nd), _f(sp.hi, nd)
    return _f(sp.median, nd) + (f" ({lo}–{hi})" if lo != hi else "")


def _session_spread(r: Row, *path: str) -> Spread | None:
    """A per-session figure over every session of every successful repeat."""
    vals = []
    for rec in r.ok:
        for s in rec["sessions"]:
            v = s["metrics"]
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(float(v))
    return Spread.of(vals)


def _environment(rec: dict[str, Any]) -> list[str]:
    env = rec.get("environment", {})
    pk = env.get("packages", {})
    commit = (env.get("git_commit") or "?")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    return [
        f"- shaper: {rec.get('shaper', '?')}, TCP congestion control: {rec.get('tcp_cc', '?')}",
        f"- kernel {env.get('kernel')}, CPU {env.get('cpu')} x{env.get('cpus')}, Python {env.get('python')}",
        f"- torch {pk.get('torch')}, transformers {pk.get('transformers')}, pyzmq {pk.get('pyzmq')}, "
        f"mininet {pk.get('mininet')}",
        f"- git commit {commit}",
        f"- model: {rec['config']['model']['dir']} ({rec['config']['model']['layers']} layers, "
        f"hidden {rec['config']['model']['hidden']})",
    ]


def write_summary(out_dir: Path, rows: list[Row], records: list[dict[str, Any]], plots: list[Path]) -> Path:
    ok = [r for r in records if r.get("status") == "ok"]
    first = ok[0] if ok else (records[0] if records else {})
    suite = first.get("suite", out_dir.name)
    band = tuple(first.get("config", {}).get("analytic_band", (0.5, 2.0)))
    lines = [f"# Results: {suite}", ""]
    lines.append(f"{len(records)} records ({len(ok)} ok, {len(records) - len(ok)} failed), "
                 f"{len(rows)} points, from `{out_dir / 'results.jsonl'}`.")
    lines.append("")
    heads = crossovers(rows)
    if heads:
        lines += ["## When does end-edge cooperation win?", "",
                  "Per-token latency (decode steps, mean of each repeat, median over repeats) of each split "
                  "placement against the baselines:", ""]
        lines += [f"- {h}" for h in heads]
        lines += ["", "Time to first token (the prompt's activations cross the uplink once):", ""]
        lines += [f"- {h}" for h in crossovers(rows, ("ttft_ms",))]
        lines.append("")
    if ok:
        lines += ["## Environment", ""] + _environment(first) + [""]
    lines += ["## Points", "",
              f"Each cell is the **{SPREAD_SHORT}** of a figure measured once per repeat (the median alone "
              "when the repeats agree or there is one; `runs`: successful / recorded repeats). "
              "Per-token p50/p95/p99 pool every decode step of every session and every repeat of the "
              "point (`tokens`: how many). Latencies in ms (per token: decode steps; e2e: whole "
              "request); bytes per generated token (prompt included) on the device's link; energy: "
              "device **estimate** from the suite's stated model (compute power x busy time + idle power "
              "x waiting + radio energy per bit); predicted and ratio (measured / predicted end-to-end "
              f"latency, accepted band {band[0]:g}-{band[1]:g}) over every session of every repeat.", "",
              f"| point | runs | TTFT, {SPREAD_SHORT} | per token mean, {SPREAD_SHORT} "
              "| per token p50 (pooled) | p95 (pooled) | p99 (pooled) | tokens "
              f"| e2e, {SPREAD_SHORT} | tok/s, {SPREAD_SHORT} | up B/tok | down B/tok | KV MiB "
              "| energy mJ/tok (est.) | predicted e2e | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.point} | 0/{len(r.records)} | failed: {r.errors[0][:80]} |" + " |" * 13)
            continue
        kv = r.kv_bytes()
        tok = r.token_latency()
        lines.append(
            f"| {r.point} | {len(r.ok)}/{len(r.records)} | {cell(r.spread('ttft_ms'))} "
            f"| {cell(r.spread('token_latency_ms', 'mean'))} "
            f"| {_f(tok['p50'])} | {_f(tok['p95'])} | {_f(tok['p99'])} | {tok['n']} "
            f"| {cell(r.spread('e2e_ms'))} | {cell(r.spread('tokens_per_s'))} "
            f"| {cell(r.spread('bytes_up_per_token'), 0)} | {cell(r.spread('bytes_down_per_token'), 0)} "
            f"| {cell(None if kv is None else kv.scaled(2**-20), 2)} "
            f"| {cell(r.spread('energy', 'per_token_mj'), 2)} "
            f"| {cell(_session_spread(r, 'predicted', 'e2e_ms'))} "
            f"| {cell(_session_spread(r, 'ratio', 'e2e'), 2)} |")
    failed = [(r.point, e) for r in rows for e in r.errors]
    if failed:
        lines += ["", "## Failures", ""] + [f"- `{p}`: {e.splitlines()[0][:300]}" for p, e in failed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
