"""Emulated mode of ``cache-run``: the policies on the seeded workload, with real blocks over the emulated
links and real generation.

The topology comes up as an :class:`~testbed.net.network.EmulatedNetwork`.  Through the launcher
(:mod:`testbed.apps.launch`) the repository's block node (``nodes/block_node.py``, the catalogue's
``blocks/``) starts on the cloud node and one block node per edge serves that edge's store to its
neighbours.  Each edge also runs an *edge agent* (``nodes/cache_edge.py``,
:mod:`testbed.apps.caching.edge_agent`) inside its namespace, started with ``net.popen`` and driven
through its stdin/stdout pipes: it evicts, fetches (over the emulated links, chunked, credit-based,
every chunk and block verified) and stores.

This process, the driver, walks the request sequence of :mod:`testbed.apps.caching.workload` (the same
as ``--replay`` for the same seed) with the same :class:`~testbed.apps.caching.policies.Policy` object:
for each request the policy says what to evict, fetch and keep; the sources are those replay uses
(:func:`testbed.apps.caching.replay.sources`: the nearest connected edge holding a unit, else the
repository); the edge's agent moves the blocks; then the driver serves the request with the model built
from the edge's blocks (one :class:`~testbed.apps.caching.serving.AdapterServer` per base and edge, a
LoRA variant's adapter added from its stored blocks; a partial fine-tune or a base as its own model).
Serving runs in the driver, outside the namespaces: it needs no network, and reading the edge's store
folder is what the edge would do.  Proactive re-placements are prefetched the same way, off the
request path.

Time to first token = the fetch's wall time (slowest source) + loading the model into memory when this
edge has not loaded it yet + a timed one-token generation + the device's RTT to its edge (from the
topology's paths: the request and the token are a few bytes).  The output is replay's
(:class:`~testbed.apps.caching.replay.Metrics`) with ``mode: emulated``, plus what the senders counted
(``sender_chunk_bytes``), ``fetch_bound_ratio_mean`` (per source of a fetch, the delivery protocol's
analytic bound ``bytes / rate + 2 RTT`` over the wall time: 1.0 = the bound) and the tokens generated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from testbed.apps.caching.analytic import CacheNetwork, cache_network
from testbed.apps.caching.blocks import BlockDir
from testbed.apps.caching.catalogue import Catalogue, Manifest, load_catalogue, model_files, write_model_dir
from testbed.apps.caching.edge_agent import EdgeAgentSettings
from testbed.apps.caching.policies import DEFAULT_WINDOW, Plan, Policy, make_policy, units_of
from testbed.apps.caching.replay import Metrics, quantiles, sources, workload_for
from testbed.apps.caching.settings import BlockNodeSettings
from testbed.apps.caching.workload import Request, digest, generate
from testbed.apps.launch import (
    NODES,
    READY,
    READY_TIMEOUT_S,
    Launcher,
    LaunchError,
    NetHost,
    Program,
    default_logs_dir,
    program_env,
)
from testbed.omp import plan_threads
from testbed.spec.errors import SpecError, TestbedError
from testbed.spec.topology import Topology

REPO_PORT = 5600
EDGE_PORT = 5601
NEW_TOKENS = 4  # tokens generated per request (the first one is timed for TTFT)
PROMPT_TOKENS = 8
MAX_LOADED = 2  # models (a base with its adapters, a partial fine-tune) held in memory per edge
REPOSITORY = "repository"  # the agents' name of the repository source


class AgentError(TestbedError):
    """An edge agent died or answered something else than a step's result."""


class _Agent:
    """An edge agent process and its pipes."""

    def __init__(self, edge: str, popen: subprocess.Popen, log: Path) -> None:
        self.edge, self.popen, self.log = edge, popen, log

    def _line(self) -> str:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            self.popen.wait(timeout=10)
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise AgentError(f"edge agent on {self.edge} exited (code {self.popen.returncode}); "
                             f"its log: {self.log}\n{tail}")
        return line

    def wait_ready(self) -> None:
        while not self._line().startswith(READY):
            pass

    def step(self, cmd: dict) -> dict:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class _EdgeServing:
    """What one edge holds in memory to serve: a server per body model (a base, or a partial
    fine-tune), the adapters added to each; at most ``MAX_LOADED`` of them, least recently used out."""

    def __init__(self, catalogue: Catalogue, store: Path, scratch: Path, work: Path) -> None:
        self.cat = catalogue
        self.store, self.scratch = BlockDir(store), BlockDir(scratch)
        self.work = work
        self.servers: OrderedDict[str, Any] = OrderedDict()  # least recently used first

    def read(self, h: str) -> bytes:
        return self.store.get(h) if self.store.has(h) else self.scratch.get(h)

    def _server(self, name: str):
        from testbed.apps.caching.serving import AdapterServer, load_base

        if name in self.servers:
            self.servers.move_to_end(name)
            return self.servers[name]
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per model loaded would flood the run's stderr
        while len(self.servers) >= MAX_LOADED:
            self.servers.popitem(last=False)  # its memory goes with it; a later request loads it again
        ckpt = write_model_dir(self.cat.models[name], self.read, self.work / name)
        self.servers[name] = AdapterServer(load_base(ckpt))
        shutil.rmtree(ckpt, ignore_errors=True)  # loaded: the checkpoint files are not needed again
        return self.servers[name]

    def prepare(self, m: Manifest) -> tuple[Any, str]:
        """The server for ``m`` and the adapter name of its requests (loaded here if need be)."""
        from peft import LoraConfig

        from testbed.apps.caching.serving import BASE

        if m.kind != "lora":
            return self._server(m.name), BASE
        server = self._server(str(m.base))
        if m.name not in server.adapters:
            adapter = Manifest(m.name, m.kind, m.base, m.weights, m.generated, m.seed,
                               [b for b in m.blocks if b.part == "adapter"], m.details)
            parts = model_files(adapter, self.read)
            server.add_adapter(m.name, LoraConfig(**parts["peft_config"]), parts["adapter"])
        return server, m.name

    def serve(self, m: Manifest, prompt: list[int]) -> tuple[float, float, list[int]]:
        """(load ms, first-token ms, tokens) of one request for ``m``."""
        from testbed.apps.caching.serving import Request as Row

        t0 = time.perf_counter()
        server, adapter = self.prepare(m)
        t1 = time.perf_counter()
        server.generate([Row(adapter, prompt)], 1)
        t2 = time.perf_counter()
        tokens = server.generate([Row(adapter, prompt)], NEW_TOKENS).tokens[0]
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, tokens


def prompt_for(req: Request, vocab: int) -> list[int]:
    """A request's prompt token ids (deterministic in its index)."""
    return [3 + (req.index * 7 + k * 13) % max(1, vocab - 3) for k in range(PROMPT_TOKENS)]


def _vocab(cat: Catalogue) -> int:
    base = next(m for m in cat.models.values() if m.kind == "base")
    cfg = next((b for b in base.blocks if b.kind == "file" and b.name == "config.json"), None)
    if cfg is None:
        return 320
    return int(json.loads(cat.blocks.get(cfg.hash)).get("vocab_size", 320))


class _Run:
    """The driver's state while the network is up."""

    def __init__(self, cat: Catalogue, view: CacheNetwork, policy: Policy, agents: dict[str, _Agent],
                 serving: dict[str, _EdgeServing]) -> None:
        self.cat, self.view, self.policy = cat, view, policy
        self.agents, self.serving = agents, serving
        self.units = policy.u
        self.metrics = Metrics(policy.name, "emulated", self.units)
        self.fetched_bytes = 0  # what the agents' fetchers delivered (the blocks' bytes)
        self.tokens = 0
        self.bound_ratio: list[float] = []  # per source of a fetch: analytic bound / wall time
        self.write_ms: list[float] = []  # per request's fetch: the store's writes after the delivery

    def apply(self, edge: str, plan: Plan, prefetch: bool) -> float | None:
        """Have ``edge``'s agent carry out ``plan``; the fetch's wall time in ms (None: nothing fetched)."""
        u = self.units
        srcs = sources(self.view, self.policy, edge, plan.fetch) if plan.fetch else {}
        fetch = {(REPOSITORY if s is None else s): u.blocks(us) for s, us in srcs.items()}
        cmd = {"evict": u.blocks(plan.evict), "store": u.blocks(plan.store), "fetch": fetch,
               "sizes": {src: [self.cat.block_sizes[h] for h in hs] for src, hs in fetch.items()}}
        reply = self.agents[edge].step(cmd)
        self.metrics.evicted(plan.evict)
        for s, us in srcs.items():
            rep = reply["reports"][REPOSITORY if s is None else s]
            want = u.bytes_of(us)
            if rep["bytes"] != want:
                raise AgentError(f"{edge}: {rep['bytes']} bytes fetched from {s or REPOSITORY}, "
                                 f"{want} asked for")
            self.fetched_bytes += rep["bytes"]
            if rep.get("bound_ratio"):
                self.bound_ratio.append(rep["bound_ratio"])
            self.metrics.moved(want, s is not None, rep["received_s"] * 1e3, prefetch)
        if plan.fetch and not prefetch:
            self.write_ms.append(reply["written_ms"] - reply["elapsed_ms"])
        return reply["elapsed_ms"] if plan.fetch else None

    def request(self, req: Request, vocab: int) -> None:
        plan = self.policy.request(req.edge, req.model)
        fetch_ms = self.apply(req.edge, plan, False)
        load_ms, first_ms, tokens = self.serving[req.edge].serve(self.cat.models[req.model],
                                                                 prompt_for(req, vocab))
        self.tokens += len(tokens)
        ttft = (fetch_ms or 0.0) + load_ms + first_ms + self.view.device_path[req.device].rtt_ms
        self.metrics.request(req, plan, self.units.mb[self.units.index[req.model]], fetch_ms, ttft)
        for edge, p in self.policy.placement().items():
            self.apply(edge, p, True)


def _block_programs(net, view: CacheNetwork, cat: Catalogue, stores: dict[str, Path]) -> list[Program]:
    progs = [Program("repository", "block_node.py",
                     BlockNodeSettings(f"tcp://0.0.0.0:{REPO_PORT}", str(cat.root / "blocks")),
                     NetHost(net, view.repository), compute=False)]
    progs += [Program(f"blocks-{e}", "block_node.py", BlockNodeSettings(f"tcp://0.0.0.0:{EDGE_PORT}",
                                                                        str(stores[e])),
                      NetHost(net, e), compute=False) for e in stores]
    return progs


def _agent_settings(net, view: CacheNetwork, edge: str, store: Path, scratch: Path,
                    capacity: int) -> EdgeAgentSettings:
    names, eps, rates, rtts = [REPOSITORY], [f"tcp://{net.ip(view.repository, edge)}:{REPO_PORT}"], \
        [view.repo_path[edge].rate_mbit], [view.repo_path[edge].rtt_ms]
    for p in view.peers(edge):
        path = view.peer_path[(p, edge)]
        names.append(p)
        eps.append(f"tcp://{net.ip(p, edge)}:{EDGE_PORT}")
        rates.append(path.rate_mbit)
        rtts.append(path.rtt_ms)
    return EdgeAgentSettings(str(store), str(scratch), capacity, names, eps, rates, rtts)


def _start_agent(net, edge: str, settings: EdgeAgentSettings, logs: Path) -> _Agent:
    from testbed.apps.launch import encode_settings

    log = logs / f"agent-{edge}.log"
    argv = [sys.executable, str(NODES / "cache_edge.py"), "--settings", encode_settings(settings)]
    with open(log, "ab") as err:
        popen = net.popen(edge, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                          env=program_env(plan_threads(None, 1)))
    return _Agent(edge, popen, log)


def _sender_counters(runs) -> dict[str, int]:
    out = {}
    for r in runs:
        lines = [ln for ln in r.stdout() if ln.startswith("{")]
        if lines:
            out[r.name] = int(json.loads(lines[-1]).get("chunk_bytes_sent", 0))
    return out


def run_emulated(topo: Topology, catalogue: Catalogue, policy_name: str, capacity_bytes: int, zipf: float,
                 requests: int, mobility: float, seed: int, window: int = DEFAULT_WINDOW,
                 shaper: str = "auto", runtime: str | None = None,
                 logs: Path | None = None, ttft_quantiles: bool = False) -> dict[str, Any]:
    """One emulated run (what ``cache-run`` without ``--replay`` does after parsing); ``ttft_quantiles``:
    add the TTFT distribution (``testbed.apps.caching.replay.quantiles``), as suites record it."""
    from testbed.net.network import EmulatedNetwork

    if catalogue.synthetic or catalogue.root is None:
        raise SpecError("cache-run", "--catalogue", "an emulated run moves real blocks: it needs a built "
                        "catalogue (testbed catalogue build)")
    view = cache_network(topo)
    units = units_of(catalogue)
    policy = make_policy(policy_name, units, view.edges, capacity_bytes, seed=seed, window=window)
    reqs = generate(workload_for(catalogue, view, zipf, requests, mobility, seed))
    logs = Path(logs) if logs is not None else default_logs_dir("cache-run")
    logs.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(catalogue)
    # imported now, not inside the first request's time to first token
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from testbed.apps.caching import serving  # noqa: F401
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cache-run-") as tmp:
        work = Path(tmp)
        stores = {e: work / e / "store" for e in view.edges}
        scratch = {e: work / e / "scratch" for e in view.edges}
        for d in (*stores.values(), *scratch.values()):
            d.mkdir(parents=True)
        agents: dict[str, _Agent] = {}
        with EmulatedNetwork(topo, shaper=shaper, runtime=runtime) as net, Launcher(logs) as launcher:
            try:
                nodes = launcher.start(_block_programs(net, view, catalogue, stores))
                launcher.wait_ready(nodes, READY_TIMEOUT_S)
                for e in view.edges:
                    agents[e] = _start_agent(net, e, _agent_settings(net, view, e, stores[e], scratch[e],
                                                                     capacity_bytes), logs)
                for a in agents.values():
                    a.wait_ready()
                serving = {e: _EdgeServing(catalogue, stores[e], scratch[e], work / e / "models")
                           for e in view.edges}
                run = _Run(catalogue, view, policy, agents, serving)
                t_requests = time.perf_counter()
                for req in reqs:
                    launcher.check()
                    run.request(req, vocab)
                requests_s = time.perf_counter() - t_requests
            finally:
                for a in agents.values():
                    a.close()
            stored = {e: sum(BlockDir(stores[e]).size(h) for h in BlockDir(stores[e])) for e in view.edges}
            launcher.stop()
            senders = _sender_counters(nodes)
            shaper_used = net.shaper
        shutil.rmtree(work, ignore_errors=True)
    wall_s = round(time.perf_counter() - start, 3)
    extra = {"ttft_ms_quantiles": quantiles(run.metrics.ttft_ms)} if ttft_quantiles else {}
    out = run.metrics.result(policy, catalogue.generated_variants(), wall_s=wall_s, **extra)
    out.update({"models": len(catalogue.models), "edges": len(view.edges), "zipf": zipf, "mobility": mobility,
                "seed": seed, "window": window, "catalogue_synthetic": False, "workload_digest": digest(reqs),
                "fetched_bytes": run.fetched_bytes,
                "store_write_ms_mean": round(sum(run.write_ms) / len(run.write_ms), 3) if run.write_ms
                else None,
                "fetch_bound_ratio_mean": round(sum(run.bound_ratio) / len(run.bound_ratio), 3)
                if run.bound_ratio else None, "sender_chunk_bytes": senders,
                "stored_bytes": stored, "tokens_generated": run.tokens, "requests_s": round(requests_s, 3),
                "shaper": shaper_used, "logs": str(logs)})
    return out


def run(args: argparse.Namespace) -> int:
    """``cache-run`` without ``--replay``: prints the same fields as replay, with ``mode: emulated``."""
    from testbed.apps.caching.commands import _print
    from testbed.spec.topology import load_topology

    topo = load_topology(args.topo)
    cat = load_catalogue(args.catalogue)
    try:
        result = run_emulated(topo, cat, args.policy, int(args.capacity_mb * 1e6), zipf=args.zipf,
                              requests=args.requests, mobility=args.mobility, seed=args.seed,
                              window=args.window, shaper=args.shaper, runtime=args.runtime)
    except (LaunchError, AgentError) as e:
        print(f"cache-run: {e}", file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0
