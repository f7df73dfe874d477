"""``testbed infer``: split inference across an emulated network.

The parent prepares the model once, brings the topology up, starts one shard node per placed
host (all but the first) and the driver on the first, through the launcher
(``testbed.apps.launch``): typed settings, ready lines, whole logs in the run's log folder,
CPU time per program, and every program stopped again on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import json
import sys
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
                  curve_keys: str | None = None) -> Program:
    settings = ShardSettings(bind=bind, model=str(model_dir), start=stage.start, end=stage.end,
                             next=next_addr, quant=quant, idle_timeout_s=idle_timeout_s,
                             curve_keys=curve_keys)
    return Program(f"shard-{stage.node}", "shard_node.py", settings, host, threads=threads)


def shard_programs(stages: list[Stage], addrs: list[str | None], host_of: Callable[[str], Host],
                   model_dir: Path, quant: str, **kw: Any) -> list[Program]:
    """A shard node for every stage but the first, listening on ``addrs[i]``; the last stage first."""
    nxt = [*addrs[1:], None]
    return [shard_program(host_of(stages[i].node), stages[i], addrs[i], nxt[i], model_dir, quant, **kw)
            for i in range(len(stages) - 1, 0, -1)]


def driver_program(host: Host, stages: list[Stage], next_addr: str | None, model_dir: Path, prompt: str,
                   max_new_tokens: int, quant: str, codec: str, kv_cache: bool,
                   prompt_ids: list[int] | None = None, timeout_s: float = 300.0,
                   curve_keys: str | None = None) -> Program:
    first = stages[0]
    settings = DriverSettings(model=str(model_dir), start=first.start, end=first.end, next=next_addr,
                              hops=[s.layers for s in stages], prompt=prompt, prompt_ids=prompt_ids,
                              max_new_tokens=max_new_tokens, codec=codec, quant=quant, kv_cache=kv_cache,
                              timeout_s=timeout_s, curve_keys=curve_keys)
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


def run_on_network(net, stages: list[Stage], model_dir: Path, prompt: str, max_new_tokens: int,
                   quant: str, codec: str, kv_cache: bool, prompt_ids: list[int] | None = None,
                   timeout_s: float = 900.0, ports: list[int] | None = None,
                   logs: Path | None = None) -> dict:
    """Start the shard nodes on ``net`` (an EmulatedNetwork that is up), run the driver, stop all.

    The programs' logs go to ``logs`` (default: a new folder under results/logs).  The result has
    the driver's measurements, each hop's CPU time from its ready line to its stop (``cpu_ms``)
    and thread count, and ``logs``."""
    logs = logs or default_logs_dir("infer")
    ports = ports or [BASE_PORT + i for i in range(len(stages))]
    addrs: list[str | None] = [None] + [f"tcp://{net.ip(s.node, stages[i - 1].node)}:{ports[i]}"
                                        for i, s in enumerate(stages) if i > 0]
    node_keys, device_keys = run_key_files(net.topo.security, logs)
    shards = shard_programs(stages, addrs, lambda node: NetHost(net, node), model_dir, quant,
                            curve_keys=node_keys)
    drv = driver_program(NetHost(net, stages[0].node), stages, addrs[1] if len(stages) > 1 else None,
                         model_dir, prompt, max_new_tokens, quant, codec, kv_cache, prompt_ids,
                         curve_keys=device_keys)
    with Launcher(logs, sharers=len(stages)) as run:
        nodes = run.start(shards)
        run.wait_ready(nodes, READY_TIMEOUT_S)
        (d,) = run.start([drv])
        run.wait_exit([d], timeout_s)
        result, _ = driver_result(d)
    for hop, r in zip(result["per_hop"], [d, *reversed(nodes)], strict=True):
        hop["cpu_ms"], hop["threads"] = r.cpu_ms, r.plan.threads
    result["omp"] = describe(program_env(d.plan), role="node")
    result["logs"] = str(logs)
    return result


def run_split_inference(topo: Topology, placement: str | list[Stage], prompt: str,
                        max_new_tokens: int = 32, quant: str = "none", codec: str = "fp32",
                        kv_cache: bool = True, shaper: str = "auto", model: str | Path | None = None,
                        runtime: str | None = None, prompt_ids: list[int] | None = None,
                        logs: Path | None = None) -> dict:
    """Split inference of ``prompt`` across ``topo``; returns the driver's measurements.

    Result keys: text, tokens, prompt_tokens, ttft_ms, tpot_ms, token_ms (every step's
    latency, the first being TTFT), total_ms, bytes_up/bytes_down (the device's link),
    per_hop (node, layers, compute/codec/transfer ms, bytes of the link into it, cpu_ms,
    threads), shaper, tcp_cc, omp, quant, codec, kv_cache, placement, logs.
    """
    from testbed.model.loading import prepare_model_dir
    from testbed.net.network import EmulatedNetwork

    model_dir = prepare_model_dir(model)
    stages = placement if isinstance(placement, list) else parse_placement(
        placement, topo, model_layers(model_dir))
    with EmulatedNetwork(topo, shaper=shaper, runtime=runtime) as net:
        result = run_on_network(net, stages, model_dir, prompt, max_new_tokens, quant, codec, kv_cache,
                                prompt_ids=prompt_ids, logs=logs)
        shaper_used, tcp_cc = net.shaper, net.tcp_cc
    for hop, st in zip(result["per_hop"], stages, strict=True):
        hop["node"] = st.node
    result.update(shaper=shaper_used, tcp_cc=tcp_cc, quant=quant, codec=codec, kv_cache=kv_cache,
                  placement=",".join(f"{s.node}={s.layers}" for s in stages))
    return result


def infer(args: argparse.Namespace) -> int:
    """CLI handler of ``testbed infer``."""
    from testbed.model.loading import prepare_model_dir
    from testbed.spec.topology import load_topology

    topo = load_topology(args.topo)  # --max-new-tokens is checked by the parser (testbed.spec.check)
    model_dir = prepare_model_dir(args.model)
    stages = parse_placement(args.placement, topo, model_layers(model_dir))
    logs = Path(args.logs) if getattr(args, "logs", None) else default_logs_dir("infer")
    try:
        result = run_split_inference(topo, stages, args.prompt, args.max_new_tokens, args.quant, args.codec,
                                     not args.no_kv_cache, args.shaper, model_dir, args.runtime, logs=logs)
    except LaunchError as e:
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
    print(f"logs: {logs}")
    return 0
