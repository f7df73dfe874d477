"""The Markdown summary of a results directory: headline, environment, one table row per point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.report.data import Row
from testbed.report.plots import crossovers


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def _ratio_cell(r: Row) -> str:
    vals = [s["metrics"]["ratio"]["e2e"] for rec in r.ok for s in rec["sessions"]
            if s["metrics"]["ratio"].get("e2e") is not None]
    return "-" if not vals else f"{sum(vals) / len(vals):.2f}"


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
                  "Per-token latency (decode steps, mean) of each split placement against the baselines:", ""]
        lines += [f"- {h}" for h in heads]
        lines += ["", "Time to first token (the prompt's activations cross the uplink once):", ""]
        lines += [f"- {h}" for h in crossovers(rows, ("ttft_ms",))]
        lines.append("")
    if ok:
        lines += ["## Environment", ""] + _environment(first) + [""]
    lines += ["## Points", "",
              "Latencies in ms (per token: decode steps; e2e: whole request); bytes per generated token "
              "(prompt included) on the device's link; energy: device **estimate** from the suite's "
              "stated model (compute power x busy time + idle power x waiting + radio energy per bit); "
              f"ratio: measured / predicted end-to-end latency (accepted band {band[0]:g}-{band[1]:g}).", "",
              "| point | TTFT | per token mean | p50 | p95 | e2e | tok/s | up B/tok | down B/tok "
              "| KV MiB | energy mJ/tok (est.) | predicted e2e | ratio | runs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.point} | failed: {r.errors[0][:80]} |" + " |" * 12 + f" 0/{len(r.records)} |")
            continue
        pred = [s["metrics"]["predicted"]["e2e_ms"] for rec in r.ok for s in rec["sessions"]]
        kv = r.kv_bytes()
        lines.append(
            f"| {r.point} | {_f(r.mean('ttft_ms'))} | {_f(r.mean('token_latency_ms', 'mean'))} "
            f"| {_f(r.mean('token_latency_ms', 'p50'))} | {_f(r.mean('token_latency_ms', 'p95'))} "
            f"| {_f(r.mean('e2e_ms'))} | {_f(r.mean('tokens_per_s'))} "
            f"| {_f(r.mean('bytes_up_per_token'), 0)} "
            f"| {_f(r.mean('bytes_down_per_token'), 0)} | {_f(None if kv is None else kv / 2**20, 2)} "
            f"| {_f(r.mean('energy', 'per_token_mj'), 2)} | {_f(sum(pred) / len(pred))} | {_ratio_cell(r)} "
            f"| {len(r.ok)}/{len(r.records)} |")
    failed = [(r.point, e) for r in rows for e in r.errors]
    if failed:
        lines += ["", "## Failures", ""] + [f"- `{p}`: {e.splitlines()[0][:300]}" for p, e in failed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
