"""``testbed infer``: split inference across an emulated network.

The parent prepares the model once, brings the topology up, starts one shard node
per placed host (all but the first), waits for their ready lines, runs the driver
in the first host and returns its JSON enriched with the run's settings.  Every
process it starts is stopped again, on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed.apps.inference.placement import Stage, parse_placement
from testbed.omp import describe
from testbed.omp import node_env as omp_node_env
from testbed.spec.errors import SpecError, TestbedError
from testbed.spec.topology import Topology

REPO = Path(__file__).resolve().parents[3]
NODES = REPO / "nodes"
BASE_PORT = 5600
READY_TIMEOUT_S = 180.0


class InferenceError(TestbedError, RuntimeError):
    """A node failed to start or the driver failed."""


def node_env(threads: int = 2) -> dict[str, str]:
    env = omp_node_env(os.environ)  # the nodes' OpenMP wait policy (testbed/omp.py)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def model_layers(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def shard_argv(bind: str, model_dir: Path, stage: Stage, next_addr: str | None, quant: str,
               threads: int = 2, idle_timeout: float = 60.0) -> list[str]:
    argv = [sys.executable, str(NODES / "shard_node.py"), "--bind", bind, "--model", str(model_dir),
            "--layers", stage.layers, "--quant", quant, "--threads", str(threads),
            "--idle-timeout", str(idle_timeout)]
    return argv + (["--next", next_addr] if next_addr else [])


def driver_argv(model_dir: Path, stages: list[Stage], next_addr: str | None, prompt: str,
                max_new_tokens: int, quant: str, codec: str, kv_cache: bool, threads: int = 2,
                prompt_ids: list[int] | None = None) -> list[str]:
    argv = [sys.executable, str(NODES / "driver.py"), "--model", str(model_dir),
            "--layers", stages[0].layers, "--hops", ",".join(s.layers for s in stages),
            "--max-new-tokens", str(max_new_tokens), "--quant", quant, "--codec", codec,
            "--threads", str(threads)]
    argv += ["--prompt-ids", ",".join(map(str, prompt_ids))] if prompt_ids else ["--prompt", prompt]
    if next_addr:
        argv += ["--next", next_addr]
    if not kv_cache:
        argv.append("--no-kv-cache")
    return argv


def wait_ready(procs: list[tuple[str, subprocess.Popen]], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Block until every process printed its READY line; InferenceError if one exits or stalls."""
    waiting = dict(procs)
    deadline = time.monotonic() + timeout_s
    while waiting:
        for name, p in list(waiting.items()):
            if p.poll() is not None:
                raise InferenceError(f"shard node on {name} exited with {p.returncode} before it was ready")
        ready, _, _ = select.select([p.stdout for p in waiting.values()], [], [], 0.5)
        for name, p in list(waiting.items()):
            if p.stdout in ready:
                line = p.stdout.readline()
                if line.startswith(b"READY"):
                    del waiting[name]
        if time.monotonic() > deadline:
            raise InferenceError(f"shard nodes not ready after {timeout_s:.0f} s: {', '.join(waiting)}")


def stop_all(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM every process, then SIGKILL whatever is left after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def _tail(path: Path, n: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:].strip()
    return ""


def _await_driver(drv: subprocess.Popen, nodes: list[tuple[str, subprocess.Popen]], where: str,
                  timeout_s: float, logs: Path) -> tuple[bytes, bytes]:
    """The driver's output; InferenceError as soon as a shard node dies or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return drv.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        dead = [(name, p.returncode) for name, p in nodes if p.poll() is not None]
        if dead:
            name, rc = dead[0]
            raise InferenceError(f"shard node on {name} exited with {rc} during the run: "
                                 f"{_tail(logs / f'{name}.log')}")
        if time.monotonic() > deadline:
            raise InferenceError(f"driver on {where} did not finish in {timeout_s:.0f} s")


def run_on_network(net, stages: list[Stage], model_dir: Path, prompt: str, max_new_tokens: int,
                   quant: str, codec: str, kv_cache: bool, prompt_ids: list[int] | None = None,
                   timeout_s: float = 900.0, ports: list[int] | None = None) -> dict:
    """Start the shard nodes on ``net`` (an EmulatedNetwork that is up), run the driver, stop all."""
    procs: list[subprocess.Popen] = []
    env = node_env()
    with tempfile.TemporaryDirectory(prefix="testbed-infer-") as tmp:
        logs = Path(tmp)
        try:
            ports = ports or [BASE_PORT + i for i in range(len(stages))]
            addrs = [None] + [f"tcp://{net.ip(s.node, stages[i - 1].node)}:{ports[i]}"
                              for i, s in enumerate(stages) if i > 0]
            started = []
            for i in range(len(stages) - 1, 0, -1):
                nxt = addrs[i + 1] if i + 1 < len(stages) else None
                err = open(logs / f"{stages[i].node}.log", "wb")  # noqa: SIM115 - closed with the dir
                p = net.popen(stages[i].node, shard_argv(addrs[i], model_dir, stages[i], nxt, quant),
                              stdout=subprocess.PIPE, stderr=err, env=env)
                procs.append(p)
                started.append((stages[i].node, p))
            try:
                wait_ready(started)
            except InferenceError as e:
                raise InferenceError(f"{e}\n" + "\n".join(
                    f"[{s.node}] {_tail(logs / f'{s.node}.log')}" for s in stages[1:])) from None
            drv = net.popen(stages[0].node,
                            driver_argv(model_dir, stages, addrs[1] if len(stages) > 1 else None, prompt,
                                        max_new_tokens, quant, codec, kv_cache, prompt_ids=prompt_ids),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            procs.append(drv)
            out, err = _await_driver(drv, started, stages[0].node, timeout_s, logs)
            lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
            if not lines:
                raise InferenceError(f"driver on {stages[0].node} failed ({drv.returncode}): "
                                     f"{err.decode(errors='replace')[-1500:]}")
            result = json.loads(lines[-1])
            if "error" in result:
                raise InferenceError(f"split inference failed: {result['error']}")
            return result
        finally:
            stop_all(procs)


def run_split_inference(topo: Topology, placement: str | list[Stage], prompt: str,
                        max_new_tokens: int = 32, quant: str = "none", codec: str = "fp32",
                        kv_cache: bool = True, shaper: str = "auto", model: str | Path | None = None,
                        runtime: str | None = None, prompt_ids: list[int] | None = None) -> dict:
    """Split inference of ``prompt`` across ``topo``; returns the driver's measurements.

    Result keys: text, tokens, prompt_tokens, ttft_ms, tpot_ms, token_ms (every step's
    latency, the first being TTFT), total_ms, bytes_up/bytes_down (the device's link),
    per_hop (node, layers, compute/codec/transfer ms and bytes of the link into it),
    shaper, tcp_cc, quant, codec, kv_cache, placement.
    """
    from testbed.model.loading import prepare_model_dir
    from testbed.net.network import EmulatedNetwork

    model_dir = prepare_model_dir(model)
    stages = placement if isinstance(placement, list) else parse_placement(
        placement, topo, model_layers(model_dir))
    with EmulatedNetwork(topo, shaper=shaper, runtime=runtime) as net:
        result = run_on_network(net, stages, model_dir, prompt, max_new_tokens, quant, codec, kv_cache,
                                prompt_ids=prompt_ids)
        shaper_used, tcp_cc = net.shaper, net.tcp_cc
    for hop, st in zip(result["per_hop"], stages, strict=True):
        hop["node"] = st.node
    result.update(shaper=shaper_used, tcp_cc=tcp_cc, omp=describe(node_env(), role="node"), quant=quant,
                  codec=codec, kv_cache=kv_cache,
                  placement=",".join(f"{s.node}={s.layers}" for s in stages))
    return result


def infer(args: argparse.Namespace) -> int:
    """CLI handler of ``testbed infer``."""
    from testbed.model.loading import prepare_model_dir
    from testbed.spec.topology import load_topology

    topo = load_topology(args.topo)
    if args.max_new_tokens < 1:
        raise SpecError("--max-new-tokens", "", "must be at least 1")
    model_dir = prepare_model_dir(args.model)
    stages = parse_placement(args.placement, topo, model_layers(model_dir))
    try:
        result = run_split_inference(topo, stages, args.prompt, args.max_new_tokens, args.quant, args.codec,
                                     not args.no_kv_cache, args.shaper, model_dir, args.runtime)
    except InferenceError as e:
        print(f"infer: {e}", file=sys.stderr)
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
              f"transfer {h['transfer_ms']:.1f} ms  up {h['bytes_up']} B  down {h['bytes_down']} B")
    return 0
