"""Run a suite: for every point x repeat bring the topology up, run the workload, tear down, record.

Records go to ``DIR/results.jsonl`` (``testbed.experiments.results``): one whole
line per point x repeat, fsync-ed.  A failed point is recorded with its error and
the suite goes on; Ctrl-C stops at once, writing nothing for the interrupted point
(the network and every process are torn down by their context managers).
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from testbed.apps.inference.sessions import Request, run_sessions
from testbed.experiments import analytic, energy, environment, metrics
from testbed.experiments.points import Point, build_topology, device_nodes, expand
from testbed.experiments.results import append_record, done_keys, read_results, repair
from testbed.files import write_atomic
from testbed.spec.errors import SpecError
from testbed.spec.suite import Suite

SCHEMA = 1


def prepare_model(suite: Suite, out_dir: Path) -> Path:
    """The model directory: the default SmolLM2 (converted once), a tiny one built from code, or a path."""
    if suite.model == "tiny":
        from testbed.model.tiny import make_tiny_model_dir

        d = out_dir / "tiny-model"
        if not (d / "config.json").exists():
            make_tiny_model_dir(d)
        return d
    from testbed.model.loading import prepare_model_dir

    return prepare_model_dir(None if suite.model == "default" else suite.model)


def model_info(model_dir: Path) -> dict[str, Any]:
    cfg = json.loads((model_dir / "config.json").read_text())
    return {
        "dir": str(model_dir),
        "layers": int(cfg["num_hidden_layers"]),
        "hidden": int(cfg["hidden_size"]),
        "heads": int(cfg["num_attention_heads"]),
        "kv_heads": int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        "head_dim": int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
    }


def chains_for(suite: Suite, point: Point, topo, layers: int) -> list[list[Any]]:
    """One stage list per parallel device: the point's placement with the device renamed."""
    from testbed.apps.inference.placement import parse_placement

    devs = device_nodes(suite, point.params.get("devices", 1))
    me = suite.roles["device"]
    stages = parse_placement(point.placement)
    chains = []
    for dev in devs:  # each renamed chain checked against the topology again (reachability)
        text = ",".join(f"{'|'.join(dev if n == me else n for n in st.nodes)}={st.layers}" for st in stages)
        chains.append(parse_placement(text, topo, layers))
    return chains


def kv_cache_bytes(info: dict[str, Any], start: int, end: int, positions: int) -> int:
    """KV-cache size of layers [start, end) holding ``positions`` tokens (fp32 K and V)."""
    return 2 * (end - start) * info["kv_heads"] * info["head_dim"] * positions * 4


def execute(suite: Suite, point: Point, model_dir: Path, info: dict[str, Any],
            logs: Path | None = None, repeat: int = 0, out_dir: Path | None = None) -> dict[str, Any]:
    """Bring the point's topology up, run its workload, tear it down; return the measured part.

    ``logs``: where the node programs' logs go (kept whole); ``repeat`` and ``out_dir`` (where a
    generated catalogue is built) matter to caching points only."""
    from testbed.net.network import EmulatedNetwork

    if suite.workload.kind == "training":
        return execute_training(suite, point, model_dir, logs)
    if suite.workload.kind == "caching":
        return execute_caching(suite, point, info, repeat, out_dir or Path("."), logs)
    topo = build_topology(suite, point)
    chains = chains_for(suite, point, topo, info["layers"])
    p = point.params
    req = Request(prompt=suite.workload.prompts[p["prompt"]], max_new_tokens=p["max_new_tokens"],
                  quant=p["quant"], codec=p.get("codec", "fp32"), kv_cache=p["kv_cache"])
    t0 = time.monotonic()
    with EmulatedNetwork(topo, shaper=suite.shaper, runtime=p.get("runtime")) as net:
        started = time.monotonic()
        out = run_sessions(net, chains, model_dir, req, started, logs=logs, events=topo.events,
                           duration_s=p.get("duration_s"))
        shaper, tcp_cc = net.shaper, net.tcp_cc
        t_done = time.monotonic()
    phases = {"network_up_s": round(started - t0, 3), "workload_s": round(t_done - started, 3),
              "teardown_s": round(time.monotonic() - t_done, 3)}
    sessions = []
    for chain, res in zip(chains, out["sessions"], strict=True):
        for hop, st in zip(res["per_hop"], chain, strict=True):
            hop["node"] = st.node
            hop["cpu_ms"] = out["cpu_ms"].get(st.node)
            # held at the end: the prompt and every generated token but the last (never fed back)
            positions = metrics.positions_sent(res.get("prompt_tokens") or 0, len(res["tokens"]), True)
            if st.end > st.start and p["kv_cache"]:
                hop["kv_cache_bytes"] = kv_cache_bytes(info, st.start, st.end, positions)
        m = metrics.session_metrics(res, p["kv_cache"])
        pred = analytic.predict(topo, chain, res)
        dev_hop = res["per_hop"][0]
        busy = dev_hop.get("compute_ms", 0.0) + dev_hop.get("codec_ms", 0.0)
        m["energy"] = energy.estimate(suite.energy, busy, m["e2e_ms"], m["bytes_up"], m["bytes_down"],
                                      m["tokens"])
        m["predicted"] = pred
        m["ratio"] = {
            "e2e": round(m["e2e_ms"] / pred["e2e_ms"], 3) if pred["e2e_ms"] else None,
        }
        sessions.append({"device": chain[0].node, "metrics": m, "raw": res})
    combined = metrics.combine([s["metrics"] for s in sessions],
                               [s["raw"].get("token_ms") or [] for s in sessions])
    return {
        "metrics": combined,
        "sessions": sessions,
        "cpu_ms": out["cpu_ms"],
        "phases": {**phases, "drivers_s": out["wall_s"]},
        "shaper": shaper,
        "tcp_cc": tcp_cc,
        "topology": topo.to_dict(),
        "text": sessions[0]["raw"].get("text"),
        **{k: out[k] for k in ("events", "events_t0_s") if k in out},
    }


def execute_training(suite: Suite, point: Point, model_dir: Path, logs: Path | None) -> dict[str, Any]:
    """A training point: bring its topology up, train (``testbed.apps.training.workload``), tear down.

    The record's ``metrics`` hold the summary figures, ``training`` the whole run (per step, per hop)."""
    import tempfile

    from testbed.apps.training.workload import TrainPoint, summary, train_point
    from testbed.net.network import EmulatedNetwork

    topo = build_topology(suite, point)
    p = point.params
    tp = TrainPoint(placement=point.placement, clients=device_nodes(suite, p.get("devices", 1)),
                    steps=p["steps"], batch=p["batch"], seq=p["seq"], scheme=p["scheme"],
                    schedule=p["schedule"], micro_batches=p["micro_batches"], codec=p["codec"],
                    grad_codec=p["grad_codec"], freeze_client=p["freeze_client"],
                    freeze_server=p["freeze_server"], data=list(suite.workload.data),
                    head_on_device=p.get("head_on_device", False), evaluate=suite.workload.evaluate)
    with tempfile.TemporaryDirectory(prefix="testbed-train-") as tmp:
        logs = logs or Path(tmp) / "logs"
        t0 = time.monotonic()
        with EmulatedNetwork(topo, shaper=suite.shaper, runtime=p.get("runtime")) as net:
            started = time.monotonic()
            res = train_point(net, topo, tp, model_dir, logs, logs)
            shaper, tcp_cc = net.shaper, net.tcp_cc
            t_done = time.monotonic()
    phases = {"network_up_s": round(started - t0, 3), "workload_s": round(t_done - started, 3),
              "teardown_s": round(time.monotonic() - t_done, 3)}
    return {"metrics": summary(res), "training": res, "phases": phases, "shaper": shaper, "tcp_cc": tcp_cc,
            "topology": topo.to_dict()}


def builds_catalogue(suite: Suite) -> bool:
    """A generated catalogue is built (real blocks) when any point of the suite is emulated."""
    return any(p.params.get("cache_mode") == "emulated" for p in expand(suite, 0))


def execute_caching(suite: Suite, point: Point, info: dict[str, Any], repeat: int, out_dir: Path,
                    logs: Path | None) -> dict[str, Any]:
    """A caching point (``testbed.apps.caching.point``): replay on the point's topology, or an emulated
    run that brings it up and tears it down.  ``metrics`` hold the summary figures, ``caching`` the run."""
    from testbed.apps.caching.point import CachePoint, catalogue_for, run_point, summary

    topo = build_topology(suite, point)
    cp = CachePoint.of(point.params)
    t0 = time.monotonic()
    cat = catalogue_for(_catalogue_spec(suite, point), out_dir, info["catalogue_built"])
    started = time.monotonic()
    res = run_point(topo, cat, cp, repeat, shaper=suite.shaper, runtime=point.params.get("runtime"),
                    logs=logs)
    phases = {"catalogue_s": round(started - t0, 3), "workload_s": round(time.monotonic() - started, 3)}
    return {"metrics": summary(res), "caching": res, "phases": phases, "shaper": res.get("shaper"),
            "topology": topo.to_dict()}


def _catalogue_spec(suite: Suite, point: Point) -> str | dict[str, Any]:
    """The point's catalogue: the suite's folder, or its generated mapping with the point's variants."""
    spec = suite.workload.catalogue
    if isinstance(spec, dict):
        return {**spec, **{k: point.params[k] for k in ("adapters", "partial") if k in point.params}}
    return str(spec)


def _check_caching(suite: Suite, points: list[Point], out_dir: Path, info: dict[str, Any]) -> None:
    """Capacities below the largest model and MILPs too large fail now, naming the suite's field."""
    from testbed.apps.caching.point import CachePoint, catalogue_for, check_point

    for p in points:
        fields = {k: f"sweep.{k}[{suite.sweep[k].index(p.params[k])}]" if k in suite.sweep
                  else f"params.{k}" for k in ("capacity_mb", "capacity_bases", "policy")
                  if k in p.params}
        cat = catalogue_for(_catalogue_spec(suite, p), out_dir, info["catalogue_built"], suite.source)
        check_point(cat, CachePoint.of(p.params), suite.source, fields)


def record_for(suite: Suite, point: Point, repeat: int, env: dict[str, Any], info: dict[str, Any]) -> dict:
    """The record skeleton: what was run (the full resolved configuration) and where."""
    return {
        "schema": SCHEMA,
        "suite": suite.name,
        "point": point.id,
        "repeat": repeat,
        "placement_name": point.placement_name,
        "kind": point.kind,
        "placement": point.placement,
        "params": point.params,
        "swept": list(point.swept),
        "labels": point.labels,
        "config": {
            "suite_file": str(suite.source),
            "topology_file": str(suite.topology_path),
            "model": info,
            "shaper_requested": suite.shaper,
            "sets": suite.sets,
            "workload": suite.workload.kind,
            "prompt_text": suite.workload.prompts.get(point.params.get("prompt", "")),
            "energy_model": asdict(suite.energy),
            "analytic_band": list(suite.band),
        },
        "environment": env,
    }


def plan(suite: Suite, out_dir: Path, only: str | None, info: dict[str, Any]) -> list[Point]:
    points = [p for p in expand(suite, info.get("layers", 0)) if p.matches(only)]
    if not points:
        raise SpecError(suite.source, "--only", f"no point matches {only!r}")
    if suite.workload.kind == "caching":
        _check_caching(suite, points, out_dir, info)
    if suite.workload.kind == "training":
        _check_training_texts(suite, points, Path(info["dir"]))
    for p in points:  # bad overrides fail now, not after an hour of running
        build_topology(suite, p)
        if suite.workload.kind == "training":  # layers out of the model's range, a device that cannot reach
            from testbed.apps.training.placement import parse_placement

            topo = build_topology(suite, p)
            first, _, rest = p.placement.partition(",")
            for dev in device_nodes(suite, p.params.get("devices", 1)):
                text = f"{dev}={first.partition('=')[2]}" + (f",{rest}" if rest else "")
                try:
                    parse_placement(text, topo, info["layers"])
                except SpecError as e:
                    raise SpecError(suite.source, f"placements.{p.placement_name}", e.message) from None
    return points


def _check_training_texts(suite: Suite, points: list[Point], model_dir: Path) -> None:
    """Every device count's texts tokenized once before anything starts: a text too short for one
    batch (or fewer built-in corpora than devices) is one line naming the suite's field."""
    from testbed.apps.training.workload import check_texts

    wl = suite.workload
    for devices in sorted({p.params.get("devices", 1) for p in points}):
        try:
            check_texts(model_dir, wl.data, devices, wl.batch, wl.seq)
        except SpecError as e:
            if e.file in wl.data:
                raise SpecError(suite.source, f"workload.data[{wl.data.index(e.file)}]", e.message) from None
            raise SpecError(suite.source, "workload.data", f"{e.file}: {e.message}") from None


Progress = Callable[[str, int, int], None]


def run_suite(suite: Suite, out_dir: Path, *, resume: bool = False, only: str | None = None,
              on_start: Callable[[int], None] | None = None,
              on_task: Callable[[Point, int, dict | None], None] | None = None,
              on_warning: Callable[[str], None] | None = None) -> Path:
    """Run every (point, repeat) not yet in ``out_dir/results.jsonl``; return that path.

    ``on_start(n_tasks)`` and ``on_task(point, repeat, record_or_None)`` feed a progress display
    (``record`` is None when the task starts); ``on_warning(line)`` hears of results lines a
    resumed run skips (a torn or corrupt line: its point runs again).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    if resume:
        records, problems = read_results(results)
        for line in problems:
            if on_warning:
                on_warning(line)
        repair(results)  # a torn last line goes; appends start on a line of their own
        done = done_keys(records)
    else:
        if results.exists():
            results.rename(out_dir / f"results.{time.strftime('%Y%m%d-%H%M%S')}.jsonl.old")
        done = set()
    if suite.workload.kind == "caching":  # no model to prepare: a point's models are its catalogue's
        model_dir, info = out_dir, {"catalogue": suite.workload.catalogue,
                                    "catalogue_built": builds_catalogue(suite)}
    else:
        model_dir = prepare_model(suite, out_dir)
        info = model_info(model_dir)
    points = plan(suite, out_dir, only, info)
    header = "".join(f"# run with --set {s}\n" for s in suite.sets)
    write_atomic(out_dir / "suite.yaml", header + suite.source.read_text())
    env = environment.collect()
    tasks = [(p, r) for r in range(suite.repeats) for p in points if (p.id, r) not in done]
    if on_start:
        on_start(len(tasks))
    for point, repeat in tasks:
        if on_task:
            on_task(point, repeat, None)
        rec = record_for(suite, point, repeat, env, info)
        t0 = time.time()
        rec["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
        rec["loadavg"] = [round(x, 2) for x in os.getloadavg()]  # a shared machine: note its load
        try:
            logs = out_dir / "logs" / f"{re.sub(r'[^A-Za-z0-9._=,-]+', '_', point.id)}.r{repeat}"
            rec.update(execute(suite, point, model_dir, info, logs, repeat=repeat, out_dir=out_dir))
            rec["status"] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a failed point is a result; the suite goes on
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"
            if getattr(e, "events", None) is not None:
                rec["events"] = e.events
            rec["traceback"] = traceback.format_exc()[-4000:]
        rec["duration_s"] = round(time.time() - t0, 3)
        append_record(results, rec)
        if on_task:
            on_task(point, repeat, rec)
    return results
