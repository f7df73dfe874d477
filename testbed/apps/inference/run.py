"""``testbed infer``: split inference across an emulated network.

The parent prepares the model once, brings the topology up, starts one shard node per placed
host (all but the first) and the driver on the first, through the launcher
(``testbed.apps.launch``): typed settings, ready lines, whole logs in the run's log folder,
CPU time per program, and every program stopped again on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.apps.inference.placement import Stage, parse_placement
from testbed.apps.inference.settings import DriverSettings, ShardSettings
from testbed.apps.launch import (
    READY_TIMEOUT_S,
    Host,
    Launcher,
    LaunchError,
    NetHost,
    Program,
    Running,
    default_logs_dir,
    program_env,
)
from testbed.net.events import EventScheduler
from testbed.omp import describe
from testbed.spec.topology import Topology
from testbed.wire.security import run_key_files

BASE_PORT = 5600


class InferenceError(LaunchError):
    """The driver failed or reported an error."""


def model_layers(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def shard_program(host: Host, stage: Stage, bind: str, next_addr: str | None, model_dir: Path, quant: str,
                  idle_timeout_s: float = 60.0, threads: int | None = None,
                  next_standbys: list[str] | None = None, node: str | None = None,
                  topo: Topology | None = None, curve_keys: str | None = None,
                  adapter: str | None = None) -> Program:
    """The shard node of ``stage`` on ``node`` (default: the stage's own node; else one of its
    standbys, which warms up before its ready line).  No program of a stage with standbys fails the
    run by dying (a kill event may hit any of them): the client judges, taking over with a standby
    or ending with its error; the run's ``node_exits`` lists the death.  ``topo``: the nodes' KV budgets;
    ``curve_keys``: the run's key file (``security: curve``); ``adapter``: a peft LoRA folder whose
    layers of the stage the node merges in (``testbed.model.adapter``)."""
    node = node or stage.node
    spec = topo.nodes.get(node) if topo is not None else None
    settings = ShardSettings(bind=bind, model=str(model_dir), start=stage.start, end=stage.end,
                             next=next_addr, quant=quant, idle_timeout_s=idle_timeout_s,
                             next_standbys=list(next_standbys or []),
                             kv_budget_mb=getattr(spec, "kv_budget_mb", None),
                             kv_int8=bool(getattr(spec, "kv_int8", False)), warmup=node != stage.node,
                             curve_keys=curve_keys, adapter=adapter)
    return Program(f"shard-{node}", "shard_node.py", settings, host, threads=threads,
                   service=not stage.standbys)


def shard_programs(stages: list[Stage], addrs: list[str | None], host_of: Callable[[str], Host],
                   model_dir: Path, quant: str, standby_addrs: list[list[str]] | None = None,
                   topo: Topology | None = None, **kw: Any) -> list[Program]:
    """A shard node for every stage but the first, listening on ``addrs[i]``; the last stage first.

    ``standby_addrs[i]``: where stage i's standbys listen (one per standby, in order); they start
    with the stage's primary (hot standbys: loaded, warm, serving the same next hop)."""
    standby_addrs = standby_addrs or [[] for _ in stages]
    nxt = [*addrs[1:], None]
    nxt_sb = [*standby_addrs[1:], []]
    out = []
    for i in range(len(stages) - 1, 0, -1):
        st = stages[i]
        for node, bind in zip(st.nodes, [addrs[i], *standby_addrs[i]], strict=True):
            out.append(shard_program(host_of(node), st, bind, nxt[i], model_dir, quant,
                                     next_standbys=nxt_sb[i], node=node, topo=topo, **kw))
    return out


def standby_addresses(net, stages: list[Stage], ports: list[list[int]] | None = None) -> list[list[str]]:
    """Where each stage's standbys listen: their address facing the stage before, on ``ports[i][j]``
    (default: BASE_PORT + 50 + 10 i + j, distinct from every primary's port)."""
    return [[f"tcp://{net.ip(sb, stages[i - 1].node)}:"
             f"{ports[i][j] if ports else BASE_PORT + 50 + 10 * i + j}" for j, sb in enumerate(s.standbys)]
            if i > 0 else [] for i, s in enumerate(stages)]


def driver_program(host: Host, stages: list[Stage], next_addr: str | None, model_dir: Path, prompt: str,
                   max_new_tokens: int, quant: str, codec: str, kv_cache: bool,
                   prompt_ids: list[int] | None = None, timeout_s: float = 300.0,
                   next_standbys: list[str] | None = None, detect_floor_ms: float = 50.0,
                   curve_keys: str | None = None, adapter: str | None = None) -> Program:
    first = stages[0]
    settings = DriverSettings(model=str(model_dir), start=first.start, end=first.end, next=next_addr,
                              hops=[s.layers for s in stages], prompt=prompt, prompt_ids=prompt_ids,
                              max_new_tokens=max_new_tokens, codec=codec, quant=quant, kv_cache=kv_cache,
                              timeout_s=timeout_s, next_standbys=list(next_standbys or []),
                              # standbys only where they were started (next_standbys given)
                              routes=[s.nodes if next_standbys is not None else [s.node] for s in stages],
                              detect_floor_ms=detect_floor_ms, curve_keys=curve_keys, adapter=adapter)
    return Program(f"driver-{first.node}", "driver.py", settings, host, service=False)


def driver_result(run: Running) -> tuple[dict[str, Any], float]:
    """The driver's JSON line and when it was read; InferenceError (with its log) if there is none."""
    found = [(t, line) for t, line in run.lines if line.startswith("{")]
    if not found:
        raise InferenceError(f"{run.name} on {run.program.host.name} failed (exit code {run.returncode}); "
                             f"its whole log: {run.log}\n{run.tail()}")
    t, line = found[-1]
    try:
        res = json.loads(line)
    except ValueError:
        raise InferenceError(f"{run.name} printed a broken result line; its whole log: {run.log}") from None
    if "error" in res:
        raise InferenceError(f"split inference from {run.program.host.name} failed: {res['error']} "
                             f"(log: {run.log})")
    return res, t


def node_events(run: Launcher, stages: list[Stage] | None = None,
                topo: Topology | None = None) -> Callable[[Any], str]:
    """The handler of kill, restart and handover events on a run.

    - kill: SIGKILL of the node's programs through the launcher (the launcher then reports the
      node's death as it reports any; a stage with a standby left is taken over by it, see
      ``split_client``);
    - restart: the node's killed shard programs start again, on the same address with the same
      settings.  A restarted node serves the sessions that start after it (a suite's next round);
      the session that lost it stays on the standby that took over (a client never goes back);
    - handover: once the network moved the device (``testbed.net.events.handover``), its driver is
      told which candidate of the first stage after it (``stages``: ``mecA|mecB=...``) is linked to
      the new cell (``topo``) by the signal ``recovery.handover_signal(k)``, and moves its session
      there, rebuilding that stage's KV cache by a re-prefill."""
    from testbed.apps.inference.recovery import handover_signal

    restarts: dict[str, int] = {}

    def handle(event: Any) -> str:
        mine = [r for r in run.procs if r.program.host.name == event.node]
        if event.kind == "kill":
            alive = [r for r in mine if not run.exited(r)]
            for r in alive:
                r.popen.send_signal(signal.SIGKILL)
            # applied once they are gone (the launcher reaps them, its CPU time read first): a restart
            # right after must find them dead
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not all(run.exited(r) for r in alive):
                time.sleep(0.005)
            return f"SIGKILL to {', '.join(r.name for r in alive) or 'no running program'}"
        if event.kind == "restart":  # the latest program of each name that is dead (not the driver)
            dead = {r.program.name.split(".")[0]: r for r in mine
                    if isinstance(r.program.settings, ShardSettings) and run.exited(r)}
            dead = {k: r for k, r in dead.items()
                    if not any(not run.exited(x) and x.program.name.split(".")[0] == k for x in mine)}
            if not dead:
                return "nothing to restart"
            n = restarts[event.node] = restarts.get(event.node, 0) + 1
            progs = [dataclasses.replace(r.program, name=f"{name}.restart{n}") for name, r in dead.items()]
            run.start(progs)
            return f"started {', '.join(p.name for p in progs)}"
        if event.kind == "handover":
            # ready drivers only: a driver hears the signal from before its ready line on (an earlier
            # one would end it: a real-time signal's default action)
            drivers = [r for r in mine if r.returncode is None and r.ready_at is not None
                       and r.name.startswith("driver")]
            return _move_sessions(event, drivers, stages, topo, handover_signal)
        raise InferenceError(f"{event.kind} events are not supported by split inference yet")

    return handle


def _move_sessions(event: Any, drivers: list[Running], stages: list[Stage] | None, topo: Topology | None,
                   handover_signal: Callable[[int], int]) -> str:
    """Tell the device's drivers to move to the candidate of stage 1 linked to the new cell."""
    if not drivers:
        return f"no running driver on {event.node}"
    cands = stages[1].nodes if stages is not None and len(stages) > 1 else []
    near = [k for k, n in enumerate(cands) if topo is not None and event.dst in topo.neighbors(n)]
    if not near:
        return (f"no candidate of the stage after {event.node} is linked to {event.dst} "
                f"(candidates: {', '.join(cands) or 'none'}): the session does not move")
    for d in drivers:
        d.popen.send_signal(handover_signal(near[0]))
    return f"{', '.join(d.name for d in drivers)}: stage 1 moves to {cands[near[0]]}"


def tie_to_events(result: dict[str, Any], records: list[dict[str, Any]], t0: float,
                  gen_start_s: float | None = None) -> None:
    """Put a driver's recoveries and handovers on the events' clock (``t0``: its 0, monotonic) and
    tie each to the event that caused it.

    A recovery gets ``detected_s`` and, where a kill of its failed node came before it, ``event``
    (its index in ``records``) and ``after_kill_ms`` (from the SIGKILL to the failure being declared);
    that kill's record gets ``recovered_by``.  A handover gets ``noticed_s`` and, from its handover
    event: ``event``, ``at_s``, ``from``/``to`` (cells), ``move_ms`` (the network's re-attachment),
    ``notice_ms`` (from the event's start to the driver acting on it) and ``tokens_affected`` (tokens
    whose step overlapped the time from the event's start to the rebuild's end; ``gen_start_s``: the
    first step's start on the events' clock, default ``result["gen_start_s"]``)."""
    for rec in result.get("recoveries") or []:
        if "detected_at_s" not in rec:
            continue
        rec["detected_s"] = round(rec["detected_at_s"] - t0, 4)
        kills = [(i, e) for i, e in enumerate(records) if e.get("kind") == "kill"
                 and e.get("kill") == rec.get("failed_node") and "started_s" in e
                 and e["started_s"] <= rec["detected_s"] + 1e-3]
        if kills:
            i, e = kills[-1]
            rec["event"] = i
            rec["after_kill_ms"] = round((rec["detected_s"] - e["started_s"]) * 1e3, 3)
            e["recovered_by"] = f"{rec['standby']} (stage {rec['stage']})"
    ends = _token_ends(result, gen_start_s)
    for h in result.get("handovers") or []:
        h["noticed_s"] = round(h["noticed_at_s"] - t0, 4)
        evs = [(i, e) for i, e in enumerate(records) if e.get("kind") == "handover"
               and "started_s" in e and e["started_s"] <= h["noticed_s"] + 1e-3]
        if not evs:
            continue
        i, e = evs[-1]
        h.update({"event": i, "at_s": e["at_s"], "from": e["from"], "to": e["to"],
                  "move_ms": round((e["actual_s"] - e["started_s"]) * 1e3, 3),
                  "notice_ms": round((h["noticed_s"] - e["started_s"]) * 1e3, 3)})
        if ends is not None:
            until = h["noticed_s"] + (h.get("rebuild_ms") or 0.0) / 1e3
            h["tokens_affected"] = sum(1 for a, b in ends if b > e["started_s"] and a < until)


def _token_ends(result: dict[str, Any], gen_start_s: float | None) -> list[tuple[float, float]] | None:
    """(start, end) of every token's step on the events' clock, from ``gen_start_s`` and ``token_ms``."""
    t = result.get("gen_start_s") if gen_start_s is None else gen_start_s
    if t is None:
        return None
    out = []
    for ms in result.get("token_ms") or []:
        out.append((t, t + ms / 1e3))
        t += ms / 1e3
    return out


def run_on_network(net, stages: list[Stage], model_dir: Path, prompt: str, max_new_tokens: int,
                   quant: str, codec: str, kv_cache: bool, prompt_ids: list[int] | None = None,
                   timeout_s: float = 900.0, ports: list[int] | None = None,
                   logs: Path | None = None, events: list[Any] | None = None,
                   standby_ports: list[list[int]] | None = None,
                   on_ready: Callable[[dict[str, Running]], None] | None = None,
                   detect_floor_ms: float = 50.0, adapter: str | Path | None = None) -> dict:
    """Start the shard nodes on ``net`` (an EmulatedNetwork that is up), run the driver, stop all.

    The programs' logs go to ``logs`` (default: a new folder under results/logs).  The result has
    the driver's measurements, each hop's CPU time from its ready line to its stop (``cpu_ms``)
    and thread count, ``recoveries`` (a failed stage taken over by its standby), ``handovers`` (the
    session moved to another cell's edge), both tied to their events (``tie_to_events``), ``node_exits``
    (shard programs the launcher saw die during the run) and ``logs``.  ``events``
    (``testbed.spec.events.Event``) run on a clock whose 0 is the start of generation (the
    driver's ready line, once its next hop answered); the result then has ``events`` (each with
    ``at_s`` and ``actual_s``) and ``gen_start_s``, the first step's start on that clock (token i
    ends ``sum(token_ms[:i+1])`` ms after it).  A run that fails keeps its events' records on the
    error (``error.events``).  ``on_ready``: called with every program by node once the driver
    started (fault injection in tests and benches); ``detect_floor_ms``: the smallest step
    deadline of the driver (``recovery.StepClock``); ``adapter``: a peft LoRA folder every program
    merges into the layers it holds (checked first with ``testbed.model.adapter.check_adapter``)."""
    logs = logs or default_logs_dir("infer")
    ports = ports or [BASE_PORT + i for i in range(len(stages))]
    addrs: list[str | None] = [None] + [f"tcp://{net.ip(s.node, stages[i - 1].node)}:{ports[i]}"
                                        for i, s in enumerate(stages) if i > 0]
    node_keys, device_keys = run_key_files(net.topo.security, logs)
    sb_addrs = standby_addresses(net, stages, standby_ports)
    lora = str(Path(adapter).resolve()) if adapter is not None else None  # nodes run elsewhere (cwd)
    shards = shard_programs(stages, addrs, lambda node: NetHost(net, node), model_dir, quant,
                            standby_addrs=sb_addrs, topo=getattr(net, "topo", None), curve_keys=node_keys,
                            adapter=lora)
    drv = driver_program(NetHost(net, stages[0].node), stages, addrs[1] if len(stages) > 1 else None,
                         model_dir, prompt, max_new_tokens, quant, codec, kv_cache, prompt_ids,
                         next_standbys=sb_addrs[1] if len(stages) > 1 else None,
                         detect_floor_ms=detect_floor_ms, curve_keys=device_keys, adapter=lora)
    with Launcher(logs, sharers=len(stages)) as run:
        nodes = run.start(shards)
        run.wait_ready(nodes, READY_TIMEOUT_S)
        sched = EventScheduler(net, events or [], node_events(run, stages, getattr(net, "topo", None)))
        try:
            (d,) = run.start([drv])
            if on_ready is not None:
                on_ready({r.program.host.name: r for r in [*nodes, d]})
            if events:  # the events' clock starts with generation (the driver's ready line)
                run.wait_ready([d], READY_TIMEOUT_S)
                sched.start(t0=d.ready_at)
            run.wait_exit([d], timeout_s)
            exits = [{"node": r.program.host.name, "program": r.name, "code": r.returncode,
                      "exited_at_s": round(r.exited_at, 6)}
                     for r in nodes if r.exited_at is not None and not r.stopping]
            result, t_line = driver_result(d)
        except LaunchError as e:
            e.events = sched.records  # type: ignore[attr-defined]  # completed by stop() below
            raise
        finally:
            sched.stop()
    if events:
        assert sched.t0 is not None
        result["events"] = sched.records
        result["gen_start_s"] = round(t_line - result.get("total_ms", 0.0) / 1e3 - sched.t0, 3)
        tie_to_events(result, sched.records, sched.t0)
    primaries = {r.program.host.name: r for r in nodes}
    for hop, st in zip(result["per_hop"][1:], stages[1:], strict=True):
        r = primaries[st.nodes[0]]
        used = [primaries[n] for n in st.nodes if primaries[n].cpu_ms]
        hop["cpu_ms"] = round(sum(x.cpu_ms for x in used), 1) if used else r.cpu_ms
        hop["threads"] = r.plan.threads
    result["per_hop"][0]["cpu_ms"], result["per_hop"][0]["threads"] = d.cpu_ms, d.plan.threads
    result["node_exits"] = exits
    result["omp"] = describe(program_env(d.plan), role="node")
    result["logs"] = str(logs)
    result["adapter"] = lora
    return result


def run_split_inference(topo: Topology, placement: str | list[Stage], prompt: str,
                        max_new_tokens: int = 32, quant: str = "none", codec: str = "fp32",
                        kv_cache: bool = True, shaper: str = "auto", model: str | Path | None = None,
                        runtime: str | None = None, prompt_ids: list[int] | None = None,
                        logs: Path | None = None, events: list[Any] | None = None,
                        on_ready: Callable[[dict[str, Running]], None] | None = None,
                        detect_floor_ms: float = 50.0, adapter: str | Path | None = None) -> dict:
    """Split inference of ``prompt`` across ``topo``; returns the driver's measurements.

    Result keys: text, tokens, prompt_tokens, ttft_ms, tpot_ms, token_ms (every step's
    latency, the first being TTFT), total_ms, bytes_up/bytes_down (the device's link),
    per_hop (node, layers, compute/codec/transfer ms, bytes of the link into it, cpu_ms,
    threads), shaper, tcp_cc, omp, quant, codec, kv_cache, placement, logs; with events (default:
    the topology's), ``events`` and ``gen_start_s`` (see ``run_on_network``).
    """
    from testbed.model.loading import prepare_model_dir
    from testbed.net.network import EmulatedNetwork

    model_dir = prepare_model_dir(model)
    stages = placement if isinstance(placement, list) else parse_placement(
        placement, topo, model_layers(model_dir))
    with EmulatedNetwork(topo, shaper=shaper, runtime=runtime) as net:
        result = run_on_network(net, stages, model_dir, prompt, max_new_tokens, quant, codec, kv_cache,
                                prompt_ids=prompt_ids, logs=logs,
                                events=topo.events if events is None else events,
                                on_ready=on_ready, detect_floor_ms=detect_floor_ms, adapter=adapter)
        shaper_used, tcp_cc = net.shaper, net.tcp_cc
    for hop, st in zip(result["per_hop"], stages, strict=True):
        hop["node"] = st.node
    result.update(shaper=shaper_used, tcp_cc=tcp_cc, quant=quant, codec=codec, kv_cache=kv_cache,
                  placement=",".join(str(s) for s in stages))
    return result


def infer(args: argparse.Namespace) -> int:
    """CLI handler of ``testbed infer``."""
    from testbed.model.loading import prepare_model_dir
    from testbed.spec.topology import load_topology

    topo = load_topology(args.topo)  # --max-new-tokens is checked by the parser (testbed.spec.check)
    events = list(topo.events)
    if getattr(args, "events", None):
        from testbed.spec.events import combined, load_events

        events = combined(events, load_events(args.events, topo, source="infer"), topo, args.events)
    model_dir = prepare_model_dir(args.model)
    stages = parse_placement(args.placement, topo, model_layers(model_dir))
    adapter = getattr(args, "adapter", None)
    if adapter is not None:  # before the network: one line naming what does not fit
        from testbed.model.adapter import check_adapter

        check_adapter(adapter, model_dir)
    logs = Path(args.logs) if getattr(args, "logs", None) else default_logs_dir("infer")
    try:
        result = run_split_inference(topo, stages, args.prompt, args.max_new_tokens, args.quant, args.codec,
                                     not args.no_kv_cache, args.shaper, model_dir, args.runtime, logs=logs,
                                     events=events, adapter=adapter)
    except LaunchError as e:
        if args.json and getattr(e, "events", None) is not None:  # what had happened by then
            print(json.dumps({"error": str(e).splitlines()[0], "events": e.events, "logs": str(logs)}))
        print(f"infer: {e}\ninfer: the programs' logs are in {logs}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    print(result.get("text", ""))
    print(f"\n{len(result['tokens'])} tokens  TTFT {result['ttft_ms']:.1f} ms  "
          f"TPOT {result['tpot_ms']:.1f} ms  "
          f"up {result['bytes_up']} B  down {result['bytes_down']} B  shaper {result['shaper']}")
    for h in result["per_hop"]:
        print(f"  {h['node']:>10} {h['layers']:>6}  compute {h['compute_ms']:.1f} ms  "
              f"transfer {h['transfer_ms']:.1f} ms  up {h['bytes_up']} B  down {h['bytes_down']} B  "
              f"cpu {h['cpu_ms']} ms  {h['threads']} thread(s)")
    for ev in result.get("events", []):
        print(f"  event {ev['kind']} at {ev['at_s']:g} s, applied at {ev['actual_s']:.2f} s"
              + (f": {ev['error']}" if "error" in ev else ""))
    for r in result.get("recoveries", []):
        print(f"  recovery: stage {r['stage']} ({r['layers']}) {r['failed_node']} -> {r['standby']}: "
              f"{r['why']}, detected in {r['detect_ms']:.1f} ms, rebuilt in {r.get('rebuild_ms', 0):.1f} ms")
    for h in result.get("handovers", []):
        print(f"  handover: {h.get('from', '?')} -> {h.get('to', '?')}, stage 1 {h['from_node']} -> "
              f"{h['to_node']} at token {h['step']}: acted on {h.get('notice_ms', 0):.1f} ms after the event "
              f"began, rebuilt in {h.get('rebuild_ms', 0):.1f} ms")
    print(f"logs: {logs}")
    return 0
