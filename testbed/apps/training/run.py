"""``testbed train``: split LoRA fine-tuning across an emulated network (or in one process).

The parent prepares the model, brings the topology up, starts one stage server per hop after the
device (the last first) and the device's client, through the launcher (``testbed.apps.launch``):
typed settings, ready lines, whole logs, CPU time, every program stopped on every way out.  The
client's JSON line is the run's measurements; the parent adds what it knows (placement, scheme,
CPU time per hop) and writes the record and the adapters under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.apps.launch import (
    READY_TIMEOUT_S,
    Launcher,
    LaunchError,
    NetHost,
    Program,
    Running,
)
from testbed.apps.training import defaults
from testbed.apps.training.placement import Stage, parse_placement
from testbed.apps.training.settings import ClientSettings, StageSettings
from testbed.spec.errors import SpecError
from testbed.spec.topology import Topology

if TYPE_CHECKING:
    from testbed.apps.training.analytic import Hop

BASE_PORT = 5700
UNSHAPED_BPS = 1e12  # a link without a rate limit (loopback, unshaped)


class TrainingError(LaunchError):
    """The client failed or reported an error."""


@dataclass(frozen=True)
class TrainOptions:
    """What ``testbed train`` trains: one record of these goes with every result."""

    steps: int = defaults.STEPS
    batch: int = defaults.BATCH
    seq: int = defaults.SEQ
    lr: float = defaults.LR
    rank: int = defaults.RANK
    alpha: float = float(defaults.ALPHA)
    targets: list[str] = field(default_factory=lambda: list(defaults.TARGET_MODULES))
    seed: int = defaults.SEED
    micro_batches: int = 1
    schedule: str = "gpipe"
    codec: str = "fp32"
    grad_codec: str = "fp32"
    data: list[str] = field(default_factory=list)
    freeze_client: float = 0.0  # share of the device's layers without adapters (the lowest ones)
    freeze_server: float = 0.0  # share of the stage servers' layers without adapters
    evaluate: bool = True  # held-out perplexity before and after
    scheme: str = "sl"  # sl: one device; sfl: devices in parallel, FedAvg every K steps; psl: no averaging
    clients: list[str] = field(default_factory=list)  # the devices (empty: the placement's first node)
    aggregate_every: int = 1  # K of sfl
    checkpoint_every: int = 0  # a checkpoint of every program after every K steps (0: none)
    drop_after_s: float = 0.0  # sfl/psl: leave out a device this late in a round (0: wait for it)
    head_on_device: bool = False  # U-shaped: the device holds the final norm, head and loss (and labels)

    def fields(self) -> dict[str, Any]:
        """The options every node program's settings carry."""
        d = asdict(self)
        for k in ("steps", "batch", "seq", "data", "freeze_client", "freeze_server", "evaluate", "scheme",
                  "clients"):
            d.pop(k)
        d["clients"] = max(1, len(self.clients))
        d["aggregate_every"] = self.averaging_every
        d["turns"] = self.scheme == "sl" and len(self.clients) > 1
        return d

    @property
    def averaging_every(self) -> int:
        """K of FedAvg, 0 for none: sfl with more than one device (one device's average is itself:
        its adapters would cross the link and back for nothing)."""
        return self.aggregate_every if self.scheme == "sfl" and len(self.clients) > 1 else 0

    def spec(self):
        from testbed.apps.training.lora import LoraSpec

        return LoraSpec(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets))

    def trainable(self, cut: int, n_layers: int) -> list[int] | None:
        """Global indices of the layers with adapters (None: all), from the freezing ratios."""
        if not self.freeze_client and not self.freeze_server:
            return None
        from testbed.apps.training.freeze import adapter_layers

        return (adapter_layers(list(range(cut)), self.freeze_client)
                + adapter_layers(list(range(cut, n_layers)), self.freeze_server))


class Loopback:
    """This machine's loopback as the 'network': every node is 127.0.0.1 and runs as a plain child."""

    def __init__(self, topo: Topology | None = None) -> None:
        self.topo = topo

    def ip(self, node: str, peer: str | None = None) -> str:
        return "127.0.0.1"

    def popen(self, node: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(argv, start_new_session=True, **kw)


class _LoopHost:
    def __init__(self, node: str) -> None:
        self.name, self.cpu_limit = node, None

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(argv, start_new_session=True, **kw)


def expand_clients(placement: str, clients: list[str], topo: Topology | None) -> tuple[list[str], str]:
    """The devices and the placement with one of them first: ``--clients`` names them, or the first
    entry's node is a pattern (``dev*=0:4``) matched against the topology's device nodes."""
    import fnmatch

    first, _, rest = placement.partition(",")
    pattern, eq, layers = first.partition("=")
    if not clients and any(ch in pattern for ch in "*?[") and topo is not None:
        clients = sorted(n.name for n in topo.hosts()
                         if n.role == "device" and fnmatch.fnmatch(n.name, pattern))
        if not clients:
            raise SpecError("--placement", pattern, f"matches no device of {topo.name}")
    if not clients:
        return [], placement
    return clients, f"{clients[0]}{eq}{layers}" + (f",{rest}" if rest else "")


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on loopback right now (the kernel's choice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def model_layers(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"])


def programs(stages: list[Stage], addrs: list[str], host_of, model_dir: Path, opt: TrainOptions,
             adapter_dir: Path | None, timeout_s: float = 600.0, client_addrs: list[str] | None = None,
             checkpoint_dir: Path | None = None, resume_step: int = 0
             ) -> tuple[list[Program], list[Program]]:
    """The stage servers (the last first) and the clients; ``addrs[i]``: where stage ``i`` listens,
    ``client_addrs[c]``: where client ``c`` reaches stage 1 (default ``addrs[1]``)."""
    nodes = opt.clients or [stages[0].node]
    client_addrs = client_addrs or [addrs[1]] * len(nodes)
    trainable = opt.trainable(stages[0].end, stages[-1].end)
    common = dict(model=str(model_dir), stages=len(stages), timeout_s=timeout_s, trainable=trainable,
                  checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, resume_step=resume_step,
                  **opt.fields())
    servers = []
    for i in range(len(stages) - 1, 0, -1):
        st = stages[i]
        extra = sorted({a for a in client_addrs if a != addrs[1]}) if i == 1 else []
        settings = StageSettings(start=st.start, end=st.end, stage=i, bind=addrs[i], also_bind=extra,
                                 next=addrs[i + 1] if i + 1 < len(stages) else None, **common)
        servers.append(Program(f"stage{i}-{st.node}", "train_stage.py", settings, host_of(st.node)))
    clients = []
    for c, node in enumerate(nodes):
        where = adapter_dir if len(nodes) == 1 or adapter_dir is None else adapter_dir / node
        settings = ClientSettings(start=0, end=stages[0].end, stage=0, next=client_addrs[c], client=c,
                                  hops=[s.layers for s in stages], steps=opt.steps, batch=opt.batch,
                                  seq=opt.seq, data=list(opt.data),
                                  adapter_dir=str(where) if where else None, **common)
        clients.append(Program(f"client-{node}", "train_client.py", settings, host_of(node), service=False))
    return servers, clients


def client_result(run: Running) -> dict[str, Any]:
    found = [line for _, line in run.lines if line.startswith("{")]
    if not found:
        raise TrainingError(f"{run.name} on {run.program.host.name} failed (exit code {run.returncode}); "
                            f"its whole log: {run.log}\n{run.tail()}")
    try:
        res = json.loads(found[-1])
    except ValueError:
        raise TrainingError(f"{run.name} printed a broken result line; its whole log: {run.log}") from None
    if "error" in res:
        raise TrainingError(f"split training from {run.program.host.name} failed: {res['error']} "
                            f"(log: {run.log})")
    return res


def run_on_network(net, stages: list[Stage], model_dir: Path, opt: TrainOptions, adapter_dir: Path | None,
                   logs: Path, timeout_s: float = 3600.0, ports: list[int] | None = None,
                   checkpoint_dir: Path | None = None, resume_step: int = 0) -> dict[str, Any]:
    """Start the stage servers on ``net`` (an EmulatedNetwork that is up, or :class:`Loopback`), run
    the client to its end, stop them all; the client's result with each hop's CPU time and threads."""
    loop = isinstance(net, Loopback)
    ports = ports or (free_ports(len(stages)) if loop else [BASE_PORT + i for i in range(len(stages))])
    addrs = [""] + [f"tcp://{net.ip(s.node, stages[i - 1].node)}:{ports[i]}"
                    for i, s in enumerate(stages) if i > 0]
    nodes = opt.clients or [stages[0].node]
    client_addrs = [f"tcp://{net.ip(stages[1].node, n)}:{ports[1]}" for n in nodes]
    host_of = _LoopHost if loop else (lambda node: NetHost(net, node))
    servers, clients = programs(stages, addrs, host_of, model_dir, opt, adapter_dir,
                                client_addrs=client_addrs, checkpoint_dir=checkpoint_dir,
                                resume_step=resume_step)
    # one micro-batch and one device at a time (sl takes turns): no two programs ever compute at once,
    # so each gets a lone process's plan, threads and wait (a brief spin on a quiet machine: a turn's
    # many small ops start without waking a sleeping thread; the passive wait made a split SmolLM2
    # step 1.41x the one-process step there, the lone plan 1.19x, bench/train_split_overhead.py)
    turns = opt.micro_batches == 1 and (len(clients) == 1 or opt.scheme == "sl")
    with Launcher(logs, sharers=1 if turns else len(stages) + len(clients) - 1) as run:
        started = run.start(servers)
        run.wait_ready(started, READY_TIMEOUT_S)
        cs = run.start(clients)
        run.wait_exit(cs, timeout_s)
        results, failed = [], []
        for node, c in zip(nodes, cs, strict=True):
            try:
                results.append((node, c, client_result(c)))
            except TrainingError as e:  # in parallel (sfl, psl) the others go on without this device
                if opt.scheme == "sl" or len(cs) == 1:
                    raise
                failed.append({"node": node, "error": str(e).splitlines()[0], "log": str(c.log)})
        if not results:
            raise TrainingError("every device failed: " + "; ".join(f["error"] for f in failed))
    for _, c, res in results:
        for hop, r in zip(res["per_hop"], [c, *reversed(started)], strict=True):
            hop["cpu_ms"], hop["threads"] = r.cpu_ms, r.plan.threads
    merged = merge_clients([r for _, _, r in results], [n for n, _, _ in results])
    merged["failed_clients"] = failed
    return merged


def adapter_bytes(result: dict[str, Any]) -> float:
    """One device's adapters message in bytes (the mean over the devices of a several-device run)."""
    sizes = [c.get("adapter_message_bytes", 0) for c in result.get("per_client", [])] \
        or [result.get("adapter_message_bytes", 0)]
    return sum(sizes) / len(sizes)


def merge_clients(results: list[dict[str, Any]], nodes: list[str]) -> dict[str, Any]:
    """One record of several devices' results: the servers' figures (the same for all) from the
    first, bytes summed over the devices per step, a step lasting until the slowest device is done."""
    if len(results) == 1:
        return results[0]
    import statistics

    steps = sorted({s for r in results for s in r.get("steps", range(len(r["step_ms"])))})
    by_step: dict[str, list[list[float]]] = {k: [[] for _ in steps]
                                             for k in ("step_ms", "bytes_up", "bytes_down")}
    for r in results:
        for i, s in enumerate(r.get("steps", range(len(r["step_ms"])))):
            for k, lists in by_step.items():
                lists[steps.index(s)].append(r[k][i])
    first = dict(max(results, key=lambda r: len(r["losses"])))  # taking turns: the last device's
    if first.get("head_on_device"):  # each device computed its own share of each step's loss
        losses = [0.0 for _ in steps]
        for r in results:
            for s, loss in zip(r["steps"], r["losses"], strict=True):
                losses[steps.index(s)] += loss
        first["losses"] = losses
    step_ms = [max(v) for v in by_step["step_ms"]]
    up = [sum(v) for v in by_step["bytes_up"]]
    down = [sum(v) for v in by_step["bytes_down"]]
    tokens = sum(r["tokens_per_s"] * sum(r["step_ms"]) / 1e3 for r in results)
    first.update(step_ms=step_ms, step_ms_mean=round(statistics.fmean(step_ms), 3),
                 step_ms_p50=round(statistics.median(step_ms), 3), bytes_up=up, bytes_down=down,
                 bytes_up_per_step=round(statistics.fmean(up), 3),
                 bytes_down_per_step=round(statistics.fmean(down), 3),
                 tokens_per_s=round(tokens / (sum(step_ms) / 1e3), 3) if sum(step_ms) else 0.0,
                 per_client=[{"node": n, "step_ms_mean": r["step_ms_mean"],
                              "bytes_up_per_step": r["bytes_up_per_step"],
                              "bytes_down_per_step": r["bytes_down_per_step"], "device": r["per_hop"][0],
                              "adapter_message_bytes": r.get("adapter_message_bytes", 0),
                              "adapter_dir": r["adapter_dir"]} for r, n in zip(results, nodes, strict=True)])
    return first


def run_training(topo: Topology | None, placement: str | list[Stage], opt: TrainOptions, *,
                 model: str | Path | None = None, local: bool = False, loopback: bool = False,
                 shaper: str = "auto", runtime: str | None = None, out: Path | None = None,
                 logs: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train across ``topo`` (or in this process with ``local``, or on loopback); the result record."""
    from testbed.model.loading import prepare_model_dir

    model_dir = prepare_model_dir(model)
    n_layers = model_layers(model_dir)
    check_topo = None if loopback or local else topo
    if not isinstance(placement, list):
        clients, placement = expand_clients(placement, opt.clients, topo)
        opt = replace(opt, clients=clients)
    stages = placement if isinstance(placement, list) else parse_placement(placement, check_topo, n_layers)
    if opt.clients and check_topo is not None:
        for node in opt.clients:  # every device must reach the first stage server
            entries = [f"{node}={stages[0].layers}"] + [f"{s.node}={s.layers}" for s in stages[1:]]
            parse_placement(",".join(entries), check_topo, n_layers)
    from testbed.apps.training.arguments import check_texts

    check_texts(model_dir, opt.data, max(1, len(opt.clients)), opt.batch, opt.seq)  # before anything starts
    out = Path(out) if out else Path("results") / f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    adapter_dir = out / "adapters"
    logs = logs or out / "logs"
    result: dict[str, Any] = {}
    ckpt = out / "checkpoints" if (opt.checkpoint_every or resume) else None
    resume_step = prepare_checkpoints(ckpt, opt, stages, model_dir, resume, local) if ckpt else 0
    if local:
        result = run_local_record(model_dir, n_layers, opt, adapter_dir, stages[0].end, ckpt, resume_step)
        network = "none"
        if len(opt.clients) > 1:
            result["per_client"] = [{"node": n, "adapter_dir": str(adapter_dir / n)} for n in opt.clients]
    elif loopback:
        result = run_on_network(Loopback(topo), stages, model_dir, opt, adapter_dir, logs,
                                checkpoint_dir=ckpt, resume_step=resume_step)
        network = "loopback"
    else:
        from testbed.net.network import EmulatedNetwork

        assert topo is not None
        try:
            with EmulatedNetwork(topo, shaper=shaper, runtime=runtime) as net:
                result = run_on_network(net, stages, model_dir, opt, adapter_dir, logs,
                                        checkpoint_dir=ckpt, resume_step=resume_step)
                network = f"emulated ({net.shaper})"
        except LaunchError as e:
            raise failure_record(e, topo, out) from None
    result["resumed_from_step"] = resume_step
    result.setdefault("failed_clients", [])
    predicted = None
    if not local:
        for hop, st in zip(result["per_hop"], stages, strict=True):
            hop["node"] = st.node
        predicted = predict_step_ms(result["per_hop"], stages, opt, None if loopback else topo,
                                    adapter_bytes(result), result.get("per_client"))
    result.update(
        scheme=opt.scheme, local=local, schedule=opt.schedule, micro_batches=opt.micro_batches,
        clients=opt.clients or [stages[0].node], placement=",".join(f"{s.node}={s.layers}" for s in stages),
        network=network, model=str(model_dir), options=asdict(opt), adapter_dir=str(adapter_dir),
        trainable_layers=opt.trainable(stages[0].end, n_layers), predicted_step_ms=predicted,
        logs=None if local else str(logs), **evaluation(model_dir, n_layers, opt, adapter_dir, result),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


class TrainingFailed(TrainingError):
    """The run failed; ``record`` is what ``result.json`` and ``--json`` get instead of a result."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def failure_record(e: LaunchError, topo: Topology, out: Path) -> TrainingFailed:
    """A failed run as a record in ``out/result.json``; a program killed by SIGKILL on a node with a
    memory limit is named as most likely over that limit (the kernel's answer to a cgroup over it)."""
    from testbed.apps.launch import ProgramFailed

    text = str(e)
    first = text.splitlines()[0] if text else type(e).__name__
    record: dict[str, Any] = {"error": first, "failed_node": None, "memory_mb": None}
    if isinstance(e, ProgramFailed):
        node = e.name.split("-", 1)[-1]
        limit = next((n.memory_mb for n in topo.hosts() if n.name == node), None)
        record.update(failed_node=node, memory_mb=limit, log=str(e.log))
        if limit is not None and "code -9" in first:
            record["error"] = first = (f"{first} (SIGKILL: most likely over {node}'s memory limit of "
                                       f"{limit} MB)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(record, indent=1))
    return TrainingFailed(first + ("\n" + "\n".join(text.splitlines()[1:]) if "\n" in text else ""), record)


def checkpoint_names(opt: TrainOptions, stages: list[Stage], local: bool) -> list[str]:
    """The programs that write checkpoints: the devices and the stage servers (``local``: one)."""
    if local:
        return ["local"]
    return [f"client{c}" for c in range(max(1, len(opt.clients)))] + \
        [f"stage{i}" for i in range(1, len(stages))]


def prepare_checkpoints(folder: Path, opt: TrainOptions, stages: list[Stage], model_dir: Path, resume: bool,
                        local: bool) -> int:
    """The step to resume from (0: a fresh start); the run's options kept beside the checkpoints, and on
    ``resume`` checked against them (a different run cannot continue these weights)."""
    from testbed.apps.training import checkpoint

    if local and len(opt.clients) > 1:
        raise SpecError("train", "--checkpoint-every", "is not supported yet for several devices in one "
                        f"process (--local) (got {len(opt.clients)} devices)")
    mine = {"options": {k: v for k, v in asdict(opt).items() if k not in ("checkpoint_every", "evaluate",
                                                                             "drop_after_s")},
            "placement": [s.layers for s in stages], "local": local, "model": str(model_dir)}
    if not resume:
        checkpoint.write_options(folder, mine)
        return 0
    theirs = checkpoint.read_options(folder)
    if theirs is None:
        raise SpecError("train", "--resume", f"no checkpoint to resume from (got {folder})")
    differ = sorted(k for k in set(mine["options"]) | set(theirs["options"])
                    if mine["options"].get(k) != theirs["options"].get(k))
    differ += [k for k in ("placement", "local", "model") if mine[k] != theirs[k]]
    if differ:
        raise SpecError("train", "--resume",
                        f"options differ from the checkpointed run's (got {', '.join(differ)})")
    return checkpoint.common_step(folder, checkpoint_names(opt, stages, local))


def run_local_record(model_dir: Path, n_layers: int, opt: TrainOptions, adapter_dir: Path,
                     cut: int, ckpt: Path | None = None, resume_step: int = 0) -> dict[str, Any]:
    from testbed.apps.training.local import client_data, run_local, run_local_clients, take_batches
    from testbed.apps.training.lora import save_adapters

    listed = opt.trainable(cut, n_layers)
    trainable = set(listed) if listed is not None else None
    nodes = opt.clients or ["device"]
    data = client_data(model_dir, opt.data, len(nodes), opt.batch, opt.seq)
    batches = [take_batches(d.train, opt.steps, opt.batch, opt.seq, opt.seed, stream=c)
               for c, d in enumerate(data)]
    if len(nodes) == 1:
        result, tensors = run_local(model_dir, n_layers, batches[0], opt.spec(), opt.lr, opt.seed,
                                    opt.micro_batches, trainable, ckpt, opt.checkpoint_every, resume_step)
        save_adapters(adapter_dir, tensors, opt.spec(), str(model_dir))
        return result
    k = opt.averaging_every
    turns = opt.scheme == "sl"
    if turns:  # device c trains steps c, c + C, ...: its first batches
        batches = [b[:len(range(c, opt.steps, len(nodes)))] for c, b in enumerate(batches)]
    result, per_client = run_local_clients(model_dir, n_layers, cut, batches, opt.spec(), opt.lr, opt.seed,
                                           opt.micro_batches, trainable, k, turns)
    for node, tensors in zip(nodes, per_client, strict=True):
        save_adapters(adapter_dir / node, tensors, opt.spec(), str(model_dir))
    return result


def evaluation(model_dir: Path, n_layers: int, opt: TrainOptions, adapter_dir: Path,
               result: dict[str, Any], base_cache: dict | None = None) -> dict[str, Any]:
    """Held-out perplexity of the base model and with the trained adapters: per client (its own
    held-out text, its own adapters) and pooled over the clients' tokens.  ``base_cache`` keeps the
    base model's figures by text across calls (a suite's points share them)."""
    if not opt.evaluate:
        return {"eval_ppl_before": None, "eval_ppl_after": None}
    import math

    from safetensors.torch import load_file

    from testbed.apps.training.local import client_data, held_out_ppl
    from testbed.apps.training.lora import PEFT_PREFIX

    nodes = opt.clients or ["device"]
    data = client_data(model_dir, opt.data, len(nodes), opt.batch, opt.seq)
    per: dict[str, dict[str, float]] = {}
    sums = {"before": 0.0, "after": 0.0}
    count = 0
    for node, d in zip(nodes, data, strict=True):
        where = adapter_dir if len(nodes) == 1 else adapter_dir / node
        saved = load_file(str(where / "adapter_model.safetensors"))
        adapters = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
        heldout = {node: d.heldout}
        key = (d.name, len(d.heldout), opt.seq)
        before = (base_cache or {}).get(key) or held_out_ppl(model_dir, n_layers, opt.spec(), None, heldout,
                                                             opt.seq)
        if base_cache is not None:
            base_cache[key] = before
        figures = {"before": before,
                   "after": held_out_ppl(model_dir, n_layers, opt.spec(), adapters, heldout, opt.seq)}
        tokens = figures["after"]["tokens"][node]
        per[node] = {"text": d.name, "tokens": tokens}
        for k, f in figures.items():
            per[node][k] = round(f["pooled"], 4)
            sums[k] += math.log(f["pooled"]) * tokens
        count += tokens
    return {"eval_ppl_before": round(math.exp(sums["before"] / count), 4),
            "eval_ppl_after": round(math.exp(sums["after"] / count), 4), "eval_per_client": per}


def _walk(topo: Topology, sources: Sequence[str], dst: str) -> list[dict[str, Any]]:
    """Each source's routed path to ``dst`` and back: its links per direction (``up``, ``down``: lists of
    (link index, direction)), one-way delay up, round trip ms, and, where its path loses packets, the
    bound TCP's loss puts on its flow each way (``cap_up``, ``cap_down``, bit/s; ``tcp_model``)."""
    from testbed.net.addressing import path_links, plan
    from testbed.net.tcp_model import loss_limited_mbit

    p = plan(topo)
    out = []
    for src in sources:
        ways = {"up": path_links(topo, p, src, dst), "down": path_links(topo, p, dst, src)}
        d = {k: sum(getattr(topo.links[i], w).delay_ms for i, w in v) for k, v in ways.items()}
        row: dict[str, Any] = {**ways, "delay_up": d["up"], "rtt": d["up"] + d["down"]}
        for key, path in ways.items():
            kept = math.prod(1 - getattr(topo.links[i], w).loss_pct / 100 for i, w in path)
            cap = loss_limited_mbit(100 * (1 - kept), row["rtt"])
            row[f"cap_{key}"] = cap * 1e6 if cap is not None else None
        out.append(row)
    return out


def _paths(topo: Topology | None, sources: Sequence[str], dst: str) -> tuple[float, float, float, float]:
    """What the routed paths between ``sources`` (sending at once, equal bytes each) and ``dst`` offer:
    (rate up, rate down in bit/s at which the sources' bytes together cross, one-way delay up ms,
    round trip ms), the delays of the longest path.

    A link that n of the C sources' paths cross carries n/C of their bytes: the bytes together take
    as long as the most loaded link needs, ``max(n / (C rate))`` a byte (one source: the slowest link
    on its path; devices of one cell: their radio links, or the shared backhaul if it is slower).  A
    path that loses packets also bounds its source's TCP flow (``tcp_model.loss_limited_mbit``)."""
    if topo is None or not sources:
        return UNSHAPED_BPS, UNSHAPED_BPS, 0.0, 0.0
    from collections import Counter

    walks = _walk(topo, sources, dst)
    rates = []
    for key in ("up", "down"):
        load = Counter(link for w in walks for link in w[key])
        per_byte = 1 / UNSHAPED_BPS
        for (i, way), n in load.items():
            bw = getattr(topo.links[i], way).bw_mbit
            if bw:
                per_byte = max(per_byte, n / (len(sources) * bw * 1e6))
        for w in walks:  # that source's share crosses no faster than its TCP flow
            if w[f"cap_{key}"] is not None:
                per_byte = max(per_byte, 1 / (len(sources) * w[f"cap_{key}"]))
        rates.append(1 / per_byte)
    return rates[0], rates[1], max(w["delay_up"] for w in walks), max(w["rtt"] for w in walks)


def _own_paths(topo: Topology | None, sources: Sequence[str], dst: str
               ) -> list[tuple[float, float, float, float]]:
    """Per source, what its own path to ``dst`` offers when the sources send at different times but
    may overlap: (rate up, rate down bit/s, one-way delay up ms, round trip ms), a link that n of the
    sources' paths cross giving each a fair share (1/n) of its rate, a lossy path TCP's bound."""
    if topo is None:
        return [(UNSHAPED_BPS, UNSHAPED_BPS, 0.0, 0.0) for _ in sources]
    from collections import Counter

    walks = _walk(topo, sources, dst)
    load = {key: Counter(link for w in walks for link in w[key]) for key in ("up", "down")}
    out = []
    for w in walks:
        rates = []
        for key in ("up", "down"):
            shares = [getattr(topo.links[i], way).bw_mbit * 1e6 / load[key][(i, way)] for i, way in w[key]
                      if getattr(topo.links[i], way).bw_mbit]
            if w[f"cap_{key}"] is not None:
                shares.append(w[f"cap_{key}"])
            rates.append(min(shares, default=UNSHAPED_BPS))
        out.append((rates[0], rates[1], w["delay_up"], w["rtt"]))
    return out


def adapter_exchange_ms(message_bytes: float, opt: TrainOptions, topo: Topology | None,
                        clients: Sequence[str], server: str) -> float:
    """Per step, the time sfl's FedAvg adds: every K steps each device sends its adapters
    (``message_bytes``, one message) to the first server, all devices at once, and waits for their
    average.  sl's handing on between turns is not in a device's step time (the next device's pull
    waits through the whole previous turn), so it is not predicted as part of one either."""
    from testbed.net.tcp_model import payload_rate, slow_start_s, transfer_s

    if not message_bytes or not opt.averaging_every:
        return 0.0
    up, down, _, rtt = _paths(topo, clients, server)
    total = message_bytes * len(clients)
    send = total / payload_rate(up / 1e6) + slow_start_s(message_bytes, up / 1e6, rtt)
    return (send + transfer_s(total, down / 1e6, rtt)) * 1e3 / opt.averaging_every


def _hop(fwd: float, bwd: float, up: float, down: float, delay: float, rtt: float) -> Hop:
    """The model's hop for one micro-batch's bytes each way over a path (rates bit/s, ms), each wave's
    first message paying TCP's slow start after idle.  One rate per hop in the model: the gradients'
    bytes are scaled to take their own direction's time."""
    from testbed.apps.training import analytic
    from testbed.net.tcp_model import slow_start_s

    return analytic.Hop(int(fwd), int(bwd * up / down), up, delay,
                        forward_restart_ms=slow_start_s(fwd, up / 1e6, rtt) * 1e3,
                        backward_restart_ms=slow_start_s(bwd, down / 1e6, rtt) * 1e3)


def predict_step_ms(per_hop: list[dict], stages: list[Stage], opt: TrainOptions,
                    topo: Topology | None, adapter_message_bytes: float = 0.0,
                    per_client: list[dict] | None = None) -> float:
    """The analytic model's step time (``testbed.apps.training.analytic``) from this run's measured
    per-micro-batch compute and message sizes and the topology's routed paths (``_paths``: several
    devices share what their paths share).  Each wave's first message on a link pays TCP's slow
    start (``testbed.net.tcp_model``): the link rested through the rest of the step, longer than the
    connection's retransmission timeout.  The adapters' exchange (``adapter_exchange_ms``) adds to
    the step: nothing else moves meanwhile.  Devices in parallel (``sfl``, ``psl``): see
    ``_predict_parallel``; devices taking turns (``sl``): the mean of each device's step alone on its
    own path (handing on between turns is in no device's step)."""
    from testbed.apps.training import analytic

    m = opt.micro_batches
    clients = opt.clients or [stages[0].node]
    if len(clients) > 1 and opt.scheme in ("sfl", "psl") and not opt.head_on_device:
        return _predict_parallel(per_hop, stages, opt, topo, adapter_message_bytes, per_client)
    if len(clients) > 1 and opt.scheme == "sl":
        # taking turns: a step is one device's alone, on its own path (not the devices' paths shared),
        # with its own compute; the mean over the steps, which go round the devices
        total = 0.0
        mine = {pc["node"]: pc for pc in per_client or []}
        for c, node in enumerate(clients):
            own = [mine[node]["device"], *per_hop[1:]] if node in mine else per_hop
            turns = len(range(c, max(opt.steps, len(clients)), len(clients)))
            total += turns * predict_step_ms(own, [replace(stages[0], node=node), *stages[1:]],
                                             replace(opt, clients=[node]), topo)
        return round(total / max(opt.steps, len(clients)), 3)
    model_stages = [analytic.Stage(h["fwd_ms"] / m, h["bwd_ms"] / m) for h in per_hop]
    hops, links = [], []
    for i in range(1, len(stages)):
        up, down, delay, rtt = _paths(topo, clients if i == 1 else [stages[i - 1].node], stages[i].node)
        links.append((up, down, delay))
        # U-shaped: the return leg's bytes cross this link too; the model has them on a hop of their own
        fwd = per_hop[i]["bytes_up_per_step"] - per_hop[i].get("head_grad_bytes_per_step", 0)
        bwd = per_hop[i]["bytes_down_per_step"] - per_hop[i].get("output_bytes_per_step", 0)
        hops.append(_hop(fwd / m, bwd / m, up, down, delay, rtt))
    if opt.head_on_device:  # the device's head: one more stage, reached back over the whole chain
        dev, last = per_hop[0], per_hop[-1]
        model_stages.append(analytic.Stage(dev["head_fwd_ms"] / m, dev["head_bwd_ms"] / m))
        hops.append(analytic.relayed(int(last["output_bytes_per_step"] / m),
                                     int(last["head_grad_bytes_per_step"] / m),
                                     [(down, up, delay) for up, down, delay in reversed(links)]))
    step_ms = analytic.predict(model_stages, hops, m, opt.schedule).step_ms
    return round(step_ms + adapter_exchange_ms(adapter_message_bytes, opt, topo, clients, stages[1].node), 3)


def _predict_parallel(per_hop: list[dict], stages: list[Stage], opt: TrainOptions, topo: Topology | None,
                      adapter_message_bytes: float, per_client: list[dict] | None) -> float:
    """Mean step time of devices training in parallel (``analytic.simulate_clients`` over the run's
    steps): each device on its own path to the first server (``_own_paths``: a link its path shares
    with other devices' gives it a fair share), starting its next step when done with its own, so its
    forward and upload overlap the server's work on the others' micro-batches; ``sfl``'s FedAvg a
    barrier every K steps (``adapter_exchange_ms`` times K).  Bytes per device are its own (from
    ``per_client`` where given, its adapters left out), else the first server's share per device."""
    from testbed.apps.training import analytic

    m, clients, k = opt.micro_batches, opt.clients, opt.averaging_every
    c_n = len(clients)
    adapters = adapter_message_bytes / k if k else 0.0  # a device's adapters each way, per step
    first = per_hop[1]
    mine = {pc["node"]: pc for pc in per_client or []}  # a device that failed has no figures
    device_hops, devices = [], []
    for node, (up, down, delay, rtt) in zip(clients, _own_paths(topo, clients, stages[1].node), strict=True):
        if node in mine:
            fwd = (mine[node]["bytes_up_per_step"] - adapters) / m
            bwd = (mine[node]["bytes_down_per_step"] - adapters) / m
        else:
            fwd = bwd = first["bytes_up_per_step"] / (c_n * m)
        device_hops.append(_hop(fwd, bwd, up, down, delay, rtt))
        h = mine[node]["device"] if node in mine else per_hop[0]
        devices.append(analytic.Stage(h["fwd_ms"] / m, h["bwd_ms"] / m))
    servers = [analytic.Stage(h["fwd_ms"] / (c_n * m), h["bwd_ms"] / (c_n * m)) for h in per_hop[1:]]
    hops = []
    for i in range(2, len(stages)):
        up, down, delay, rtt = _paths(topo, [stages[i - 1].node], stages[i].node)
        fwd = per_hop[i]["bytes_up_per_step"] / (c_n * m)
        bwd = per_hop[i]["bytes_down_per_step"] / (c_n * m)
        hops.append(_hop(fwd, bwd, up, down, delay, rtt))
    barrier = adapter_exchange_ms(adapter_message_bytes, opt, topo, clients, stages[1].node) * k
    return round(analytic.simulate_clients(devices, device_hops, servers, hops, m, opt.schedule,
                                           max(1, opt.steps), k, barrier), 3)


def train(args: argparse.Namespace) -> int:
    """CLI handler of ``testbed train``."""
    from testbed.apps.training.arguments import check
    from testbed.spec.topology import load_topology

    check(args)
    topo = load_topology(args.topo)
    opt = TrainOptions(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, rank=args.rank,
                       alpha=args.alpha, targets=args.targets, seed=args.seed,
                       micro_batches=args.micro_batches, schedule=args.schedule, codec=args.codec,
                       grad_codec=args.grad_codec, data=args.data, freeze_client=args.freeze_client,
                       freeze_server=args.freeze_server, evaluate=not args.no_eval, scheme=args.scheme,
                       clients=args.clients, aggregate_every=args.aggregate_every,
                       checkpoint_every=args.checkpoint_every, drop_after_s=args.drop_after,
                       head_on_device=args.head_on_device)
    out = Path(args.out) if args.out else None
    try:
        result = run_training(topo, args.placement, opt, model=args.model, local=args.local,
                              loopback=args.loopback, shaper=args.shaper, runtime=args.runtime, out=out,
                              resume=args.resume)
    except LaunchError as e:
        print(f"train: {e}", file=sys.stderr)
        if args.json and isinstance(e, TrainingFailed):
            print(json.dumps(e.record))
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    losses = result["losses"]
    print(f"{result['scheme']} {result['schedule']} M={result['micro_batches']}  {len(losses)} steps  "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}  step {result['step_ms_mean']:.1f} ms  "
          f"{result['tokens_per_s']:.0f} tokens/s  up {result['bytes_up_per_step']:.0f} B/step  "
          f"down {result['bytes_down_per_step']:.0f} B/step")
    for h in result["per_hop"]:
        print(f"  {h.get('node', '-'):>10} {h['layers']:>6}  fwd {h.get('fwd_ms', 0):.1f} ms  "
              f"bwd {h.get('bwd_ms', 0):.1f} ms  idle {h.get('idle_ms', 0):.1f} ms  "
              f"peak activations {h['peak_act_bytes']} B")
    print(f"adapters: {result['adapter_dir']}")
    return 0
