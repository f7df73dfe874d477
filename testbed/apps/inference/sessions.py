"""Run one experiment point on a live network: shared shard nodes, one driver per device.

The shard nodes of the downstream stages start once and serve every device's session; each
device runs its own driver (its own first shard) at the same time.  All of them go through the
launcher (``testbed.apps.launch``), which measures each program's CPU time from its ready line to
its stop (a driver is ready once its next hop answered, just before it starts generating) and
keeps their logs.  Drivers start together with the shard nodes (after them where a stage has
standbys: those must be up before the session relies on them); each waits for its next hop
before it starts timing, so start-up overlaps but no measurement includes it.  The result also
has the moment generation started relative to the network coming up (for trace timelines).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import (
    BASE_PORT,
    InferenceError,
    driver_program,
    driver_result,
    node_events,
    shard_programs,
    standby_addresses,
    tie_to_events,
)
from testbed.apps.launch import READY_TIMEOUT_S, Launcher, LaunchError, NetHost, default_logs_dir
from testbed.net.events import EventScheduler
from testbed.wire.security import run_key_files


@dataclass
class Request:
    prompt: str
    max_new_tokens: int
    quant: str = "none"
    codec: str = "fp32"
    kv_cache: bool = True
    timeout_s: float = 600.0


def run_sessions(net, chains: list[list[Stage]], model_dir: Path, req: Request,
                 net_started: float, logs: Path | None = None,
                 ports: list[int] | None = None, events: list[Any] | None = None,
                 duration_s: float | None = None) -> dict[str, Any]:
    """Run one request per chain at the same time; chains share every stage after the first.

    ``net_started``: ``time.monotonic()`` when the network came up; ``logs``: the programs' log
    folder (default: a new one under results/logs); ``ports``: the downstream stages' ports
    (default BASE_PORT + 1, + 2, ...).  Returns ``{"sessions": [driver result + gen_start_s, ...],
    "cpu_ms": {node: ms}, "wall_s": s, "logs": folder}``.

    ``events`` (``testbed.spec.events.Event``) run on a clock whose 0 is the first driver's ready
    line (generation starts); the result then has ``events`` (each applied one with its
    ``actual_s``) and ``events_t0_s`` (that 0 on the network's clock).  ``duration_s``: every
    device sends its request again, in rounds, until that long after the same 0; each session
    has ``requests`` (per round: gen_start_s, tokens, token_ms), its other figures are the first
    round's.  (Each round starts a new driver program: a round's start-up is a gap in the load.)
    """
    downstream = chains[0][1:]
    for c in chains[1:]:
        if c[1:] != downstream:
            raise ValueError("parallel devices must share the downstream stages")
    # The first downstream stage listens on the address facing the first device.
    ports = ports or [BASE_PORT + i for i in range(1, len(downstream) + 1)]
    addrs: list[str | None] = [None]
    for i, s in enumerate(downstream, start=1):
        addrs.append(f"tcp://{net.ip(s.node, chains[0][i - 1].node)}:{ports[i - 1]}")
    if downstream and len({net.ip(downstream[0].node, c[0].node) for c in chains}) > 1:
        raise InferenceError(f"the devices reach {downstream[0].node} on different addresses: "
                             "parallel devices must share one segment (a cell)")
    logs = logs or default_logs_dir("run")
    node_keys, device_keys = run_key_files(net.topo.security, logs)
    sb_addrs = standby_addresses(net, chains[0])  # hot standbys (``mec|cloud=...``), shared like the stages
    shards = shard_programs(chains[0], addrs, lambda node: NetHost(net, node), model_dir, req.quant,
                            standby_addrs=sb_addrs, curve_keys=node_keys)
    drivers = [driver_program(NetHost(net, c[0].node), c, addrs[1] if downstream else None, model_dir,
                              req.prompt, req.max_new_tokens, req.quant, req.codec, req.kv_cache,
                              next_standbys=sb_addrs[1] if downstream else None, curve_keys=device_keys)
               for c in chains]
    with Launcher(logs, sharers=len(shards) + len(drivers)) as run:
        t_start = time.monotonic()
        # a session relies on its standbys from its first token: with standbys, the drivers start once
        # every shard node (a standby warms up before its ready line) is ready
        early = not any(st.standbys for st in chains[0])
        nodes = run.start(shards + drivers if early else shards)
        nodes, drvs = nodes[:len(shards)], nodes[len(shards):]
        run.wait_ready(nodes, READY_TIMEOUT_S)
        drvs = drvs or run.start(drivers)
        sched = EventScheduler(net, events or [], node_events(run, chains[0], net.topo))
        t0 = None
        if events or duration_s:
            run.wait_ready(drvs, READY_TIMEOUT_S)
            t0 = min(d.ready_at for d in drvs)
            sched.start(t0)
        rounds = [drvs]
        try:
            run.wait_exit(drvs, req.timeout_s)  # a shard node that dies fails the point now, not at a timeout
            while duration_s and time.monotonic() < t0 + duration_s:
                again = [dataclasses.replace(p, name=f"{p.name}.{len(rounds) + 1}") for p in drivers]
                rounds.append(run.start(again))
                run.wait_exit(rounds[-1], req.timeout_s)
        except LaunchError as e:
            e.events = sched.records  # type: ignore[attr-defined]  # what happened before the failure
            raise
        finally:
            sched.stop()
        t_end = time.monotonic()
        outs = [[driver_result(d) for d in r] for r in rounds]
    cpu = {r.program.host.name: r.cpu_ms for r in nodes}
    results = []
    for i, d in enumerate(drvs):
        per_round = []
        for out in outs:
            res, t_line = out[i]
            res["gen_start_s"] = round(t_line - res.get("total_ms", 0.0) / 1e3 - net_started, 3)
            if t0 is not None:  # recoveries and handovers tied to their events, on the events' clock
                start = t_line - res.get("total_ms", 0.0) / 1e3 - t0
                tie_to_events(res, sched.records, t0, gen_start_s=start)
            per_round.append(res)
        res = per_round[0]
        if duration_s:
            res["requests"] = [{"gen_start_s": r["gen_start_s"], "tokens": r["tokens"],
                                "token_ms": r.get("token_ms", [])} for r in per_round]
        results.append(res)
        cpu.setdefault(d.program.host.name, d.cpu_ms)
    out = {"sessions": results, "cpu_ms": cpu, "wall_s": round(t_end - t_start, 3), "logs": str(logs)}
    if t0 is not None:
        out["events"] = sched.records
        out["events_t0_s"] = round(t0 - net_started, 3)
    return out
