"""Kills at random times through ``experiments/faults.yaml``: hangs, lost records, leftovers, output.

Each run is one ``testbed run experiments/faults.yaml`` (a child process, as a user runs it) of the
split placements with and without a standby of the edge's shard (``split-standby``: ``mec|cloud``;
``split``: ``mec`` alone), whose events are a SIGKILL of mec at a time drawn from ``--seed`` (uniform
in ``--window``, seconds after generation began) and its restart ``--restart-after`` s later.  A
reference run without events comes first.  Per run it checks:

- hang: the child did not end within ``--timeout`` s (it is then stopped: SIGTERM, then SIGKILL);
- lost records: ``results.jsonl`` lacks a point, a line does not parse, or a record has neither
  ``ok`` nor an ``error`` with its events;
- leftovers: what the project's own ``testbed.net.clean.leftovers`` finds of every network the child
  brought up (root devices, processes, cgroups, state file; the run ids are those of the state files
  the child owned while it ran) and namespaces of those runs;
- output: ``split-standby`` must end ``ok`` with the reference's tokens, and one recovery (tied to
  the kill) when the kill met generation; ``split`` must end ``ok`` and identical when the kill came
  after generation, else with an error record (no standby).  The table also says whether the
  restart started mec's shard again (``started``) or came after the run (``skipped``).

    .venv/bin/python bench/fault_kills.py [--runs 20] [--seed 1] [--model tiny] [--tokens 96]
                                          [--window 0.2,2.0] [--restart-after 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed.net.clean import NETNS_DIR, leftovers
from testbed.net.naming import PREFIX, load_states

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "experiments" / "faults.yaml"
PLACEMENTS = ("split-standby", "split")


def run_suite(out: Path, events: Path, model: str, cut: int, tokens: int, timeout_s: float) -> dict:
    """One ``testbed run`` of the two split placements with ``events``; what happened to it."""
    argv = [sys.executable, "-m", "testbed", "run", str(SUITE), "--out", str(out),
            "--only", "kind=split",  # split and split-standby: the baselines do not meet a kill here
            "--set", f"model={model}", "--set", f"params.cut={cut}", "--set", "repeats=1",
            "--set", f"params.max_new_tokens={tokens}",
            "--set", f"sweep.events=[{events}]"]
    t0 = time.monotonic()
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    run_ids: set[str] = set()
    hang = False
    while child.poll() is None:
        run_ids |= {s["run_id"] for s in load_states() if s.get("owner_pid") == child.pid}
        if time.monotonic() - t0 > timeout_s:
            hang = True
            os.killpg(child.pid, signal.SIGTERM)  # our own child's group: testbed run stops cleanly
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            break
        time.sleep(0.3)
    output = child.stdout.read() if child.stdout else ""
    left: dict[str, list] = {}
    for rid in sorted(run_ids):
        for kind, items in leftovers(rid).items():
            if items:
                left.setdefault(kind, []).extend(items)
        ns = [p.name for p in NETNS_DIR.glob(f"{PREFIX}{rid}*")] if NETNS_DIR.is_dir() else []
        if ns:
            left.setdefault("namespaces", []).extend(ns)
    return {"hang": hang, "rc": child.returncode, "wall_s": round(time.monotonic() - t0, 1),
            "run_ids": sorted(run_ids), "leftovers": left, "output": output[-2000:],
            "records": read_records(out / "results.jsonl")}


def read_records(path: Path) -> dict[str, dict] | None:
    """placement name -> record; None if a line does not parse (a torn or lost record)."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        out[rec["placement_name"]] = rec
    return out


def generation_end_s(rec: dict) -> float | None:
    """When generation ended on the events' clock (None without a session)."""
    sessions = rec.get("sessions") or []
    if not sessions:
        return None
    raw = sessions[0]["raw"]
    return raw["gen_start_s"] - rec.get("events_t0_s", 0.0) + sum(raw["token_ms"]) / 1e3


def check(res: dict, ref: list[int]) -> dict:
    """The four properties of one run, and what the standby point recorded."""
    recs = res["records"]
    lost = recs is None or set(recs) != set(PLACEMENTS) or any(
        r.get("status") not in ("ok", "error") or (r["status"] == "error" and "events" not in r)
        for r in recs.values())
    row = {"hang": res["hang"], "lost": lost, "leftovers": sum(len(v) for v in res["leftovers"].values()),
           "identical": False, "met": None, "recoveries": None, "after_kill_ms": None, "split": "-",
           "restart": "-"}
    if lost:
        return row
    sb, plain = recs["split-standby"], recs["split"]
    kill = next((e for e in sb.get("events", []) if e.get("kind") == "kill"), {})
    row["kill_actual_s"] = kill.get("actual_s")
    restart = next((e for e in sb.get("events", []) if e.get("kind") == "restart"), {})
    row["restart"] = ("started" if str(restart.get("detail", "")).startswith("started") else
                      "skipped" if "skipped" in restart else "error" if "error" in restart else "-")
    end = generation_end_s(sb)
    row["met"] = "actual_s" in kill and end is not None and kill["actual_s"] < end
    if sb["status"] == "ok":
        raw = sb["sessions"][0]["raw"]
        rec = raw.get("recoveries") or []
        row["recoveries"] = len(rec)
        row["after_kill_ms"] = rec[0].get("after_kill_ms") if rec else None
        row["identical"] = raw["tokens"] == ref and len(rec) == (1 if row["met"] else 0) and (
            not rec or rec[0].get("event") is not None)
    plain_met = any(e.get("kind") == "kill" and "actual_s" in e for e in plain.get("events", [])) and \
        plain["status"] == "error"
    if plain["status"] == "ok":
        row["split"] = "ok, identical" if plain["sessions"][0]["raw"]["tokens"] == ref else "ok, DIFFERENT"
    else:
        row["split"] = "error (no standby)" if plain_met else "error"
    return row


def fmt(v: object) -> str:
    return "-" if v is None else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="tiny", help="tiny (2 layers, built from code) or default (SmolLM2)")
    ap.add_argument("--cut", type=int, default=None, help="device layers (default: 1 tiny, 4 SmolLM2)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens (default: 96 tiny, 48 SmolLM2)")
    ap.add_argument("--window", default="0.2,2.0", help="kill times drawn uniformly in LO,HI seconds")
    ap.add_argument("--restart-after", type=float, default=1.0, help="restart mec this long after (0: never)")
    ap.add_argument("--timeout", type=float, default=300.0, help="a run longer than this is a hang (s)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    cut = a.cut if a.cut is not None else (1 if a.model == "tiny" else 4)
    tokens = a.tokens or (96 if a.model == "tiny" else 48)
    lo, hi = (float(x) for x in a.window.split(","))
    out = a.out or Path(tempfile.mkdtemp(prefix="fault-kills-"))
    rng = random.Random(a.seed)
    none = REPO / "experiments" / "events" / "none.yaml"
    print(f"reference run (no event) in {out}/ref ...", flush=True)
    ref_res = run_suite(out / "ref", none, a.model, cut, tokens, a.timeout)
    ref_recs = ref_res["records"] or {}
    if "split-standby" not in ref_recs or ref_recs["split-standby"]["status"] != "ok":
        print(f"the reference run failed:\n{ref_res['output']}")
        return 1
    ref = ref_recs["split-standby"]["sessions"][0]["raw"]["tokens"]
    rows = []
    print(f"{'run':>3} {'kill at s':>9} {'applied':>8} {'met':>5} {'hang':>5} {'lost':>5} {'left':>5} "
          f"{'recov':>5} {'kill->detect ms':>15} {'identical':>9} {'restart':>7}  split (no standby)  wall s")
    for i in range(a.runs):
        at = round(rng.uniform(lo, hi), 2)
        d = out / f"run{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        ev = [f"  - {{at_s: {at}, kill: mec}}"]
        if a.restart_after > 0:
            ev.append(f"  - {{at_s: {round(at + a.restart_after, 2)}, restart: mec}}")
        (d / "kill.yaml").write_text("events:\n" + "\n".join(ev) + "\n")
        res = run_suite(d / "suite", d / "kill.yaml", a.model, cut, tokens, a.timeout)
        row = {"run": i, "at_s": at, **check(res, ref), "wall_s": res["wall_s"]}
        rows.append(row)
        (d / "check.json").write_text(json.dumps({**row, "leftovers_found": res["leftovers"],
                                                  "run_ids": res["run_ids"], "output": res["output"]}))
        print(f"{i:>3} {at:>9.2f} {fmt(row.get('kill_actual_s')):>8} {fmt(row['met']):>5} {row['hang']!s:>5} "
              f"{row['lost']!s:>5} {row['leftovers']:>5} {fmt(row['recoveries']):>5} "
              f"{fmt(row['after_kill_ms']):>15} {row['identical']!s:>9} {row['restart']:>7}  "
              f"{row['split']:<18}  {row['wall_s']}",
              flush=True)
    met = [r for r in rows if r["met"]]
    detect = [r["after_kill_ms"] for r in rows if r["after_kill_ms"] is not None]
    print(f"\n{len(rows)} runs (seed {a.seed}, model {a.model}, {tokens} tokens): "
          f"hangs {sum(r['hang'] for r in rows)}, "
          f"lost records {sum(r['lost'] for r in rows)}, leftovers {sum(r['leftovers'] for r in rows)}, "
          f"standby output identical {sum(r['identical'] for r in rows)}/{len(rows)} "
          f"(kill met generation in {len(met)}; recoveries {sum(r['recoveries'] or 0 for r in rows)})")
    if detect:
        print(f"kill -> failure declared: median {statistics.median(detect):.1f} ms, "
              f"min {min(detect):.1f}, max {max(detect):.1f} ms")
    bad = [r for r in rows if r["hang"] or r["lost"] or r["leftovers"] or not r["identical"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
