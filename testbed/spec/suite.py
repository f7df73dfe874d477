"""Experiment suite files (``experiments/*.yaml``): schema and validation.

A suite names a topology, a workload, the placements to compare, the parameter
sweep and the number of repeats.  Relative paths are resolved against the suite
file's directory.  Example::

    name: quick
    topology: ../topologies/device-edge-cloud.yaml
    model: default                 # default (SmolLM2-135M) | tiny | a checkpoint dir / GGUF file
    roles: {device: phone, edge: mec, cloud: cloud}   # optional; inferred from node roles
    workload:
      prompts: prompts/short.yaml  # a prompt set: {prompts: [{id, text}, ...]}
      max_new_tokens: 8
      devices: 1                   # devices running sessions in parallel
    baselines: [on-device, edge-offload, cloud-offload]   # default: all three
    placements:                    # split placements; {cut} and {layers} are substituted
      split: "phone=0:{cut},mec={cut}:{layers}"
    params: {cut: 8, codec: fp32}  # fixed parameter values
    sweep:
      mode: cartesian              # or zip (all lists of equal length)
      uplink_mbit: [2, 10, 50]
    repeats: 3                     # default 3
    shaper: auto
    energy: {compute_w: 2.5, tx_nj_per_bit: 100}

A placement may carry its own parameter values: ``NAME: {placement: TEMPLATE, params: {...}}``.  They
override ``params`` and ``sweep`` at that placement's points, so a placement that pins a swept value
has one point per value of the others (``split-training.yaml``'s ``ushape``: one point per cut).

A training suite (``workload: {kind: training, steps: 4, batch: 4, seq: 64, data: [...], devices: 1}``)
trains at every point instead (``testbed.apps.training.workload``); it has no baselines, and takes the
training parameters (``TRAINING_PARAMS``) but not the inference ones (``INFERENCE_PARAMS``).  Every
``data`` entry is checked before anything runs (``testbed.spec.corpora``: a readable, non-empty UTF-8
file or a built-in corpus found here), and their count must be 1 or each point's device count.

A caching suite (``workload: {kind: caching, catalogue: {...} or PATH, requests: 300}``) runs one edge
caching policy on a seeded request workload at every point (``testbed.apps.caching.point``, the engine
of ``testbed cache-run``); it has no baselines or placements and takes the caching parameters
(``CACHING_PARAMS``: ``policy`` and ``capacity_mb`` or ``capacity_bases`` are required), ``runtime``
and the link and node fields, nothing else.  ``catalogue`` is a built catalogue folder (``testbed
catalogue build``) or a mapping ``{base, adapters, partial, seed, shared_layers}`` of one the runner
generates (then ``adapters`` and ``partial`` are parameters too).

Parameters (in ``params`` or ``sweep``): see ``PARAMS``; besides those,
``links.A-B.up.FIELD`` / ``links.A-B.down.FIELD`` set one direction of the link
written ``between: [A, B]`` and ``nodes.N.FIELD`` sets a node field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.spec import caching as cache_limits
from testbed.spec import check, corpora
from testbed.spec.check import Checker
from testbed.spec.checkpoint import check_model_path
from testbed.spec.errors import SpecError, got
from testbed.spec.options import (
    BASELINES,
    CACHE_MODES,
    CACHE_POLICIES,
    CATALOGUE_BASES,
    CODECS,
    QUANTS,
    RUNTIMES,
    SHAPERS,
    SWEEP_MODES,
    TRAIN_SCHEDULES,
    TRAIN_SCHEMES,
    WORKLOAD_KINDS,
)
from testbed.spec.parse import check_direction_field, check_node_field, parse_topology
from testbed.spec.topology import Topology
from testbed.spec.yamlfile import load_yaml, parse_yaml

# Parameter name -> one-line meaning.  Network parameters act on every device's access link.
PARAMS: dict[str, str] = {
    "uplink_mbit": "device -> first hop bandwidth (Mbit/s)",
    "downlink_mbit": "first hop -> device bandwidth (Mbit/s)",
    "delay_ms": "one-way propagation delay of the access link, both directions (ms)",
    "loss_pct": "random loss of the access link, both directions (%)",
    "trace": "channel trace for the access link (a file, or a base name with .up/.down files)",
    "trace_start_s": "where replay starts on the clock of every traced link (s)",
    "events": "link changes, outages, kills during the workload (a list, or an events file)",
    "cut": "cut layer substituted for {cut} in split placements",
    "quant": "weight quantization of every shard",
    "codec": "activation codec on the wire",
    "kv_cache": "KV cache on (true) or off (false)",
    "device_cpu": "CPU share of one core for every device node",
    "runtime": "node runtime (process | docker)",
    "prompt": "prompt id from the prompt set (default: every prompt in the set)",
    "max_new_tokens": "tokens generated per request",
    "devices": "devices running sessions in parallel against the same edge",
    "duration_s": "each device sends its request again until this long after generation began (s)",
    "scheme": "training: sl (devices take turns), sfl (parallel, FedAvg), psl (parallel, no averaging)",
    "schedule": "training: pipeline schedule of the micro-batches (gpipe | 1f1b)",
    "micro_batches": "training: micro-batches per step (must divide workload.batch)",
    "grad_codec": "training: activation-gradient codec on the wire (upstream)",
    "freeze_client": "training: share of the device's layers without adapters (0..1)",
    "freeze_server": "training: share of the stage servers' layers without adapters (0..1)",
    "head_on_device": "training: U-shaped, the device also keeps the final norm, head and loss (true|false)",
    "policy": "caching: every edge's policy (lru | lfu | block-lru | trimcaching | random | optimal)",
    "capacity_mb": "caching: each edge's store in MB (10^6 bytes)",
    "capacity_bases": "caching: each edge's store in base models (x the bytes of the catalogue's fp32 base)",
    "zipf": "caching: Zipf exponent of the models' popularity",
    "mobility": "caching: probability that a device hands over to another cell after a request",
    "seed": "caching: workload seed of the first repeat (repeat r uses seed + r)",
    "window": "caching: requests between proactive placements (trimcaching, optimal)",
    "requests": "caching: requests per run (default: workload.requests)",
    "cache_mode": "caching: replay (analytic delivery times) or emulated (real blocks over the links)",
    "adapters": "caching: LoRA variants of a generated catalogue",
    "partial": "caching: partial fine-tunes of a generated catalogue",
}
TRAINING_PARAMS = ("scheme", "schedule", "micro_batches", "grad_codec", "freeze_client", "freeze_server",
                   "head_on_device")
INFERENCE_PARAMS = ("quant", "kv_cache", "prompt", "max_new_tokens", "duration_s")
CACHING_PARAMS = ("policy", "capacity_mb", "capacity_bases", "zipf", "mobility", "seed", "window", "requests",
                  "cache_mode", "adapters", "partial")
CATALOGUE_KEYS = ("base", "adapters", "partial", "seed", "shared_layers")
CATALOGUE_DEFAULTS: dict[str, Any] = {"base": "smollm2", "adapters": 40, "partial": 8, "seed": 1,
                                      "shared_layers": None}
NETWORK_PARAMS = ("uplink_mbit", "downlink_mbit", "delay_ms", "loss_pct", "trace", "trace_start_s", "events")
TOP_KEYS = ("name", "description", "topology", "model", "roles", "workload", "baselines", "placements",
            "params", "sweep", "repeats", "shaper", "energy", "analytic")
WORKLOAD_KEYS = ("kind", "prompts", "max_new_tokens", "devices", "steps", "batch", "seq", "data", "evaluate",
                 "catalogue", "requests")
ENERGY_KEYS = ("compute_w", "idle_w", "tx_nj_per_bit", "rx_nj_per_bit")
ANALYTIC_KEYS = ("band",)
PLACEMENT_KEYS = ("placement", "params")
ROLE_KEYS = ("device", "edge", "cloud")
_LINK_PARAM = re.compile(r"^links\.([A-Za-z][A-Za-z0-9]*)-([A-Za-z][A-Za-z0-9]*)\.(up|down)\."
                         r"(bw_mbit|delay_ms|jitter_ms|loss_pct|queue_pkts|trace|format)$")
_NODE_PARAM = re.compile(r"^nodes\.([A-Za-z][A-Za-z0-9]*)\.(cpu|memory_mb|runtime|kv_budget_mb|kv_int8)$")
_PLACEMENT_VARS = re.compile(r"\{([a-z_]+)\}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# the number each numeric parameter is checked against (the topology's bounds for link and node values)
_PARAM_RANGES: dict[str, check.Range] = {
    "uplink_mbit": check.BW_MBIT, "downlink_mbit": check.BW_MBIT, "delay_ms": check.DELAY_MS,
    "loss_pct": check.LOSS_PCT, "cut": check.CUT, "device_cpu": check.CPU,
    "max_new_tokens": check.MAX_NEW_TOKENS, "devices": check.DEVICES, "trace_start_s": check.TRACE_START_S,
    "duration_s": check.DURATION_S, "micro_batches": check.Range(ge=1, le=4096, integer=True),
    "freeze_client": check.PROBABILITY, "freeze_server": check.PROBABILITY,
    "capacity_mb": cache_limits.CAPACITY_MB, "capacity_bases": cache_limits.CAPACITY_BASES,
    "zipf": cache_limits.ZIPF, "mobility": check.PROBABILITY, "seed": check.SEED,
    "window": cache_limits.WINDOW,
    "requests": cache_limits.REQUESTS, "adapters": cache_limits.VARIANTS, "partial": cache_limits.VARIANTS,
}
_PARAM_CHOICES: dict[str, tuple[str, ...]] = {"quant": QUANTS, "codec": CODECS, "runtime": RUNTIMES,
                                              "grad_codec": CODECS, "scheme": TRAIN_SCHEMES,
                                              "schedule": TRAIN_SCHEDULES, "policy": CACHE_POLICIES,
                                              "cache_mode": CACHE_MODES}
TRAIN_STEPS = check.Range(ge=1, le=1_000_000, integer=True)
TRAIN_BATCH = check.Range(ge=1, le=4096, integer=True)
TRAIN_SEQ = check.Range(ge=1, le=8192, integer=True, note="the model's context")


@dataclass(frozen=True)
class EnergyModel:
    """Device energy estimate: compute power x busy time + idle power x waiting time + radio energy per bit.

    Defaults are round, order-of-magnitude figures for a phone-class SoC and an LTE
    radio; they are assumptions, not measurements: set them per suite.
    """

    compute_w: float = 2.5
    idle_w: float = 0.3
    tx_nj_per_bit: float = 100.0
    rx_nj_per_bit: float = 50.0


@dataclass(frozen=True)
class Workload:
    prompts_file: Path
    prompts: dict[str, str]  # id -> text, in file order
    max_new_tokens: int = 16
    devices: int = 1
    kind: str = "inference"  # or "training": each point trains (testbed.apps.training.workload)
    steps: int = 4  # training: optimizer steps per point
    batch: int = 4  # training: sequences per step
    seq: int = 64  # training: tokens per sequence
    data: list[str] = field(default_factory=list)  # training: text files or built-in corpora, one per client
    evaluate: bool = True  # training: held-out perplexity before and after each point
    # caching: a built catalogue folder (absolute path) or the mapping of a generated one (CATALOGUE_KEYS)
    catalogue: str | dict[str, Any] | None = None
    requests: int = 300  # caching: requests per run


@dataclass
class Suite:
    name: str
    source: Path
    description: str
    topology_path: Path
    topology_data: dict[str, Any]  # the raw topology YAML; points apply their overrides to a copy
    model: str  # "default" | "tiny" | a path
    roles: dict[str, str]  # device/edge/cloud -> node name ("cloud" may be missing)
    workload: Workload
    baselines: list[str]
    placements: dict[str, str]  # name -> template
    params: dict[str, Any]
    sweep_mode: str
    sweep: dict[str, list[Any]]
    repeats: int
    shaper: str
    energy: EnergyModel
    band: tuple[float, float] = (0.5, 2.0)  # accepted measured/predicted ratio range
    sets: list[str] = field(default_factory=list)  # command-line overrides applied (--set)
    device_nodes: list[str] = field(default_factory=list)  # nodes that can run a device session, in order
    # a placement's own parameter values (``placements: {NAME: {placement, params}}``): they override
    # the suite's params and sweep at that placement's points (pinned: its points differ in nothing else)
    placement_params: dict[str, dict[str, Any]] = field(default_factory=dict)




def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(os.path.expandvars(value)))
    return p if p.is_absolute() else (base / p).resolve()


def device_names(topo: Topology, device: str) -> list[str]:
    """Nodes that can run a device session: the suite's device first, then the other device-role nodes."""
    return [device, *(n for n, spec in topo.nodes.items() if spec.role == "device" and n != device)]


def load_prompts(path: Path, src: Path, fld: str) -> dict[str, str]:
    """A prompt set file: ``prompts: [{id: ..., text: ...}, ...]``; errors name that file."""
    c = Checker(path)
    doc = c.mapping(load_yaml(path, src, fld), "", ("description", "prompts"))
    items = c.items(doc.get("prompts"), "prompts", "a non-empty list of {id, text}")
    out: dict[str, str] = {}
    for i, p in enumerate(items):
        body = c.mapping(p, f"prompts[{i}]", ("id", "text"), "a mapping {id, text}")
        for key in ("id", "text"):
            if key not in body:
                raise c.fail(f"prompts[{i}].{key}", "missing")
        pid = body["id"]
        if isinstance(pid, bool) or not isinstance(pid, str | int) or not str(pid).strip():
            raise c.fail(f"prompts[{i}].id", f"must be a name or a number {got(pid)}")
        text = c.text(body["text"], f"prompts[{i}].text")
        if str(pid) in out:
            raise c.fail(f"prompts[{i}].id", f"duplicate id {str(pid)!r}")
        out[str(pid)] = text
    return out


def _check_devices(c: Checker, fld: str, n: int, suite: Suite) -> int:
    devs = suite.device_nodes
    if n > len(devs):
        raise c.fail(fld, f"must be <= {len(devs)}, the device nodes of {suite.topology_path.name} "
                          f"({', '.join(devs)}) (got {n})")
    return n


def _check_events(src: Path, fld: str, value: Any, suite: Suite) -> Any:
    """An events list (checked against the suite's topology; kept as written) or an events file
    (its absolute path; its errors name it)."""
    from testbed.spec.events import load_events, parse_events

    topo = parse_topology(suite.topology_data, suite.topology_path)
    if isinstance(value, str):
        path = _resolve(suite.source.resolve().parent, Checker(src).path(value, fld, "an events file"))
        load_events(path, topo, src, fld)
        return str(path)
    parse_events(value, topo, src, fld)
    return value


def check_param(src: Path, fld: str, name: str, value: Any, suite: Suite) -> Any:
    """Validate one parameter value; return it normalized (numbers typed, trace paths made absolute)."""
    c = Checker(src)
    if not isinstance(name, str):
        raise c.fail(fld, f"a parameter name must be a string {got(name)}")
    if name in _PARAM_RANGES:
        number = c.number(value, fld, _PARAM_RANGES[name])
        return _check_devices(c, fld, number, suite) if name == "devices" else number
    if name in _PARAM_CHOICES:
        return c.choice(value, fld, _PARAM_CHOICES[name])
    if name in ("kv_cache", "head_on_device"):
        return c.boolean(value, fld)
    if name == "trace":
        p = _resolve(suite.source.resolve().parent, c.path(value, fld, "a trace path"))
        if not p.is_file() and not (Path(f"{p}.up").is_file() and Path(f"{p}.down").is_file()):
            raise c.fail(fld, f"no such trace file (or .up/.down pair): {p}")
        return str(p)
    if name == "events":
        return _check_events(src, fld, value, suite)
    if name == "prompt":
        if str(value) not in suite.workload.prompts:
            known = ", ".join(suite.workload.prompts)
            raise c.fail(fld, f"unknown prompt id {value!r} (the prompt set has {known})")
        return str(value)
    m = _LINK_PARAM.match(name)
    if m:
        a, b, _direction, what = m.groups()
        links = suite.topology_data["links"]
        if not any(sorted(link.get("between", [])) == sorted([a, b]) for link in links):
            raise c.fail(fld, f"no link between {a} and {b} in {suite.topology_path}")
        if what == "trace":
            return check_param(src, fld, "trace", value, suite)
        # each value on its own here; rules between fields (jitter <= delay) when a point is built
        return check_direction_field(c, fld, what, value)
    m = _NODE_PARAM.match(name)
    if m:
        if m.group(1) not in suite.topology_data["nodes"]:
            raise c.fail(fld, f"no node {m.group(1)!r} in {suite.topology_path}")
        return check_node_field(c, fld, m.group(2), value)
    raise c.fail(fld, f"unknown parameter {name!r} (known: {', '.join(PARAMS)}, "
                      "links.A-B.up|down.FIELD, nodes.N.FIELD)")


def _roles(c: Checker, given: Any, topo: Topology) -> dict[str, str]:
    given = {} if given is None else c.mapping(given, "roles", ROLE_KEYS,
                                               "a mapping of device/edge/cloud to node names")
    roles: dict[str, str] = {}
    for role in ROLE_KEYS:
        if role in given:
            name = given[role]
            if not isinstance(name, str) or name not in topo.nodes:
                raise c.fail(f"roles.{role}", f"no node {name!r} in {topo.source}")
            if topo.nodes[name].role == "cell":
                raise c.fail(f"roles.{role}", f"{name!r} is a cell (a bridge that runs nothing): name a host")
            roles[role] = name
        else:
            found = [n for n, spec in topo.nodes.items() if spec.role == role]
            if found:
                roles[role] = found[0]
    for role in ("device", "edge"):
        if role not in roles:
            raise c.fail(f"roles.{role}", f"the topology {topo.source} has no {role} node; name one")
    return roles


def load_suite(path: str | Path, sets: list[str] | None = None) -> Suite:
    """Read and validate a suite file with its ``--set`` overrides; raise one-line SpecErrors.

    An error in a value that an override set names the override: ``--set: sweep.cut[0]: ...``.
    """
    src = Path(path)
    sets = list(sets or [])
    data = Checker(src).mapping(load_yaml(src), "", what="a mapping of suite fields")
    merged = apply_sets(dict(data), sets, src)
    keys = [item.partition("=")[0] for item in sets]
    try:
        suite = parse_suite(merged, src)
    except SpecError as e:
        if e.file == str(src) and any(e.field == k or e.field.startswith((f"{k}.", f"{k}[")) for k in keys):
            raise SpecError("--set", e.field, e.message) from None
        raise
    suite.sets = sets
    return suite


def apply_sets(data: dict[str, Any], sets: list[str], src: Path) -> dict[str, Any]:
    """Apply command-line overrides ``KEY[.NAME]=YAML_VALUE`` (``model=tiny``, ``sweep.cut=[4,8]``).

    Values are read by the same YAML loader as the files (``1e3`` is a number, duplicate keys refused).
    """
    out = dict(data)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key or not all(key.split(".")):
            raise SpecError(src, "--set", f"must be KEY=VALUE, e.g. sweep.uplink_mbit=[2,20] (got {item!r})")
        value = parse_yaml(raw, "--set", key)
        top, dot, sub = key.partition(".")  # params.links.a-b.up.bw_mbit: the rest is one name
        if dot:
            child = out.get(top)
            out[top] = {**(child if isinstance(child, Mapping) else {}), sub: value}
        else:
            out[top] = value
    return out


def parse_suite(data: Any, src: Path) -> Suite:
    """Validate loaded suite data (relative paths are resolved against ``src``'s folder)."""
    c = Checker(src)
    data = c.mapping(data, "", TOP_KEYS)
    base = src.resolve().parent
    name = data.get("name") or src.stem
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise c.fail("name", f"must be letters, digits, '-', '_' or '.' {got(name)}")
    if "topology" not in data:
        raise c.fail("topology", "missing (the topology file the suite runs on)")
    topo_path = _resolve(base, c.path(data["topology"], "topology", "a topology file path"))
    # the topology's own errors (syntax, duplicate keys, values) name the topology file
    topo_data = load_yaml(topo_path, src, "topology")
    topo = parse_topology(topo_data, topo_path)
    if topo_data.get("links") is None:
        topo_data["links"] = []

    model = data.get("model", "default")
    c.path(model, "model", "default, tiny or a checkpoint path")
    if model not in ("default", "tiny"):
        model = str(check_model_path(_resolve(base, model), src, "model"))

    roles = _roles(c, data.get("roles"), topo)
    devices = device_names(topo, roles["device"])
    if "workload" not in data:
        raise c.fail("workload", f"missing (a mapping of {', '.join(WORKLOAD_KEYS)})")
    wl = c.mapping(data["workload"], "workload", WORKLOAD_KEYS)
    kind = c.choice(wl.get("kind", "inference"), "workload.kind", WORKLOAD_KINDS)
    n_devices = c.number(wl.get("devices", 1), "workload.devices", check.DEVICES)
    if kind == "training":
        workload = _training_workload(c, wl, base, n_devices)
    elif kind == "caching":
        workload = _caching_workload(c, wl, base)
    else:
        pfile = _resolve(base, c.path(wl.get("prompts"), "workload.prompts", "a prompt set file"))
        workload = Workload(
            prompts_file=pfile,
            prompts=load_prompts(pfile, src, "workload.prompts"),
            max_new_tokens=c.number(wl.get("max_new_tokens", 16), "workload.max_new_tokens",
                                    check.MAX_NEW_TOKENS),
            devices=n_devices,
        )

    baselines = data.get("baselines", list(BASELINES) if kind == "inference" else [])
    if kind == "training" and baselines:
        raise c.fail("baselines", f"a training suite compares its placements only (got {baselines!r})")
    if kind == "caching" and baselines:
        raise c.fail("baselines", f"a caching suite compares its policies (sweep policy) {got(baselines)}")
    if kind == "caching" and data.get("placements"):
        raise c.fail("placements", "a caching suite has no placements: every device sends requests to "
                                   f"its cell's edge (sweep policy instead) {got(data['placements'])}")
    if not isinstance(baselines, list):
        raise c.fail("baselines", f"must be a list of {', '.join(BASELINES)} {got(baselines)}")
    for i, b in enumerate(baselines):
        c.choice(b, f"baselines[{i}]", BASELINES)
    if "cloud-offload" in baselines and "cloud" not in roles:
        raise c.fail("baselines", "cloud-offload needs a cloud node (roles.cloud)")

    given_placements = data.get("placements") or {}
    c.mapping(given_placements, "placements",
              what="a mapping of names to placements like 'phone=0:{cut},mec={cut}:30'")
    placements: dict[str, Any] = {}
    own_params: dict[str, Any] = {}  # placement -> its own raw parameters, checked below
    for pname, entry in given_placements.items():
        fld = f"placements.{pname}"
        if pname in BASELINES:
            raise c.fail(fld, "name is reserved for a baseline")
        tmpl = entry
        if isinstance(entry, Mapping):  # {placement: TEMPLATE, params: {NAME: VALUE}}
            body = c.mapping(entry, fld, PLACEMENT_KEYS, "a placement string or {placement, params}")
            if "placement" not in body:
                raise c.fail(f"{fld}.placement", "missing (the placement string of this entry)")
            tmpl = body["placement"]
            own_params[pname] = c.mapping(body.get("params") or {}, f"{fld}.params",
                                          what="a mapping of parameter -> value")
            fld = f"{fld}.placement"
        placements[pname] = tmpl
        if not isinstance(tmpl, str) or "=" not in tmpl:
            raise c.fail(fld, f"must be a string like 'phone=0:{{cut}},mec={{cut}}:30' {got(tmpl)}")
        for var in _PLACEMENT_VARS.findall(tmpl):
            if var not in ("cut", "layers"):
                raise c.fail(fld, f"unknown variable {{{var}}} (known: {{cut}}, {{layers}})")
        for part in tmpl.split(","):
            for node in part.split("=", 1)[0].split("|"):  # a stage's node, then its standbys
                node = node.strip()
                if node not in topo.nodes or topo.nodes[node].role == "cell":
                    raise c.fail(fld, f"no node {node!r} in the topology")
    if not baselines and not placements and kind != "caching":
        raise c.fail("placements", "nothing to run: no baselines and no placements")

    repeats = c.number(data.get("repeats", 3), "repeats", check.REPEATS)
    shaper = c.choice(data.get("shaper", "auto"), "shaper", SHAPERS)

    en = c.mapping(data.get("energy") or {}, "energy", ENERGY_KEYS)
    energy = EnergyModel(**{
        k: c.number(v, f"energy.{k}", check.POWER_W if k.endswith("_w") else check.NJ_PER_BIT)
        for k, v in en.items()})

    an = c.mapping(data.get("analytic") or {}, "analytic", ANALYTIC_KEYS)
    band = an.get("band", [0.5, 2.0])
    rule = f"must be [low, high] with 0 < low < high {got(band)}"
    if not isinstance(band, list) or len(band) != 2:
        raise c.fail("analytic.band", rule)
    low, high = (c.number(x, f"analytic.band[{i}]", check.BAND) for i, x in enumerate(band))
    if not low < high:
        raise c.fail("analytic.band", rule)

    suite = Suite(
        name=name, source=src, description=str(data.get("description", "")), topology_path=topo_path,
        topology_data=topo_data, model=model, roles=roles, workload=workload, baselines=list(baselines),
        placements=dict(placements), params={}, sweep_mode="cartesian", sweep={}, repeats=repeats,
        shaper=shaper, energy=energy, band=(low, high), device_nodes=devices,
    )
    _check_devices(c, "workload.devices", n_devices, suite)

    params = c.mapping(data.get("params") or {}, "params", what="a mapping of parameter -> value")
    suite.params = {k: check_param(src, f"params.{k}", k, v, suite) for k, v in params.items()}
    suite.placement_params = {
        pname: {k: check_param(src, f"placements.{pname}.params.{k}", k, v, suite) for k, v in pp.items()}
        for pname, pp in own_params.items()}

    sweep = dict(c.mapping(data.get("sweep") or {}, "sweep", what="a mapping of parameter -> list of values"))
    mode = c.choice(sweep.pop("mode", "cartesian"), "sweep.mode", SWEEP_MODES)
    for k, values in sweep.items():
        c.items(values, f"sweep.{k}", "a non-empty list")
        if k in suite.params:
            raise c.fail(f"sweep.{k}", "also set in params: set it in one place")
        suite.sweep[k] = [check_param(src, f"sweep.{k}[{i}]", k, v, suite) for i, v in enumerate(values)]
    if mode == "zip" and len({len(v) for v in suite.sweep.values()}) > 1:
        lens = ", ".join(f"{k}: {len(v)}" for k, v in suite.sweep.items())
        raise c.fail("sweep", f"zip needs lists of equal length (got {lens})")
    suite.sweep_mode = mode
    _check_kind_params(c, suite)
    uses_cut = any("{cut}" in t and "cut" not in suite.placement_params.get(n, {})
                   for n, t in placements.items())
    if uses_cut and "cut" not in suite.params and "cut" not in suite.sweep:
        raise c.fail("placements", "a placement uses {cut}: set params.cut or sweep.cut")
    return suite


def _training_workload(c: Checker, wl: Mapping[str, Any], base: Path, n_devices: int) -> Workload:
    """``workload: {kind: training, steps, batch, seq, data, devices, evaluate}``; ``data`` entries are
    files (resolved against the suite's folder) or built-in corpora (``fortunes:NAME``, ``licenses:NAME``);
    ``evaluate: false`` skips the held-out perplexity (where every point trains alike, as in a pipeline
    schedule comparison, it is the same figure each time)."""
    for key in ("prompts", "max_new_tokens"):
        if key in wl:
            raise c.fail(f"workload.{key}", "is for inference workloads (this one is kind: training)")
    data = wl.get("data") or []
    if not isinstance(data, list):
        raise c.fail("workload.data", f"must be a list of text files or built-in corpora {got(data)}")
    files = []
    builtins = corpora.builtin_corpora()
    for i, d in enumerate(data):
        fld = f"workload.data[{i}]"
        text = c.path(d, fld, "a text file or a built-in corpus")
        path = _resolve(base, text)
        corpora.check_entry(text, path, str(c.source), fld, builtins)
        files.append(text if corpora.is_builtin_name(text, path) else str(path))
    return Workload(prompts_file=base, prompts={}, devices=n_devices, kind="training",
                    steps=c.number(wl.get("steps", 4), "workload.steps", TRAIN_STEPS),
                    batch=c.number(wl.get("batch", 4), "workload.batch", TRAIN_BATCH),
                    seq=c.number(wl.get("seq", 64), "workload.seq", TRAIN_SEQ), data=files,
                    evaluate=c.boolean(wl.get("evaluate", True), "workload.evaluate"))


def _caching_workload(c: Checker, wl: Mapping[str, Any], base: Path) -> Workload:
    """``workload: {kind: caching, catalogue, requests}``: ``catalogue`` is a built catalogue folder
    (resolved against the suite's folder) or the mapping of a generated one (``CATALOGUE_KEYS``)."""
    for key in ("prompts", "max_new_tokens", "devices", "steps", "batch", "seq", "data", "evaluate"):
        if key in wl:
            raise c.fail(f"workload.{key}", "is not a field of a caching workload (kind: caching takes "
                                            "catalogue and requests; every device of the topology sends)")
    given = wl.get("catalogue", {})
    catalogue: str | dict[str, Any]
    if isinstance(given, str):
        path = _resolve(base, c.path(given, "workload.catalogue", "a catalogue folder"))
        if not (path / "catalogue.json").is_file():
            raise c.fail("workload.catalogue", "not a catalogue folder (no catalogue.json; "
                                               f"testbed catalogue build --out DIR) {got(str(path))}")
        catalogue = str(path)
    else:
        m = c.mapping(given, "workload.catalogue", CATALOGUE_KEYS,
                      "a catalogue folder or a mapping {base, adapters, partial, seed, shared_layers}")
        catalogue = dict(CATALOGUE_DEFAULTS)
        catalogue["base"] = c.choice(m.get("base", catalogue["base"]), "workload.catalogue.base",
                                     CATALOGUE_BASES)
        for key, rng in (("adapters", cache_limits.VARIANTS), ("partial", cache_limits.VARIANTS),
                         ("seed", check.SEED)):
            catalogue[key] = c.number(m.get(key, catalogue[key]), f"workload.catalogue.{key}", rng)
        if m.get("shared_layers") is not None:
            catalogue["shared_layers"] = c.number(m["shared_layers"], "workload.catalogue.shared_layers",
                                                  cache_limits.SHARED_LAYERS)
    return Workload(prompts_file=base, prompts={}, kind="caching", catalogue=catalogue,
                    requests=c.number(wl.get("requests", 300), "workload.requests", cache_limits.REQUESTS))


def _kind_params(kind: str) -> set[str]:
    """The parameters of ``PARAMS`` a workload kind takes (link and node fields: every kind)."""
    if kind == "caching":
        return {*CACHING_PARAMS, "runtime"}
    other = TRAINING_PARAMS if kind == "inference" else INFERENCE_PARAMS
    return set(PARAMS) - set(other) - set(CACHING_PARAMS)


def _check_caching_params(c: Checker, suite: Suite) -> None:
    """A policy and one capacity are required; a given catalogue fixes its own variants."""
    have = {*suite.params, *suite.sweep}
    if "policy" not in have:
        raise c.fail("params.policy", "missing (set params.policy or sweep.policy: "
                                      f"{', '.join(CACHE_POLICIES)})")
    caps = [k for k in ("capacity_mb", "capacity_bases") if k in have]
    if len(caps) != 1:
        raise c.fail("params.capacity_mb", "set exactly one of capacity_mb and capacity_bases "
                                           f"(in params or sweep) {got(caps)}")
    if isinstance(suite.workload.catalogue, str):
        for key in ("adapters", "partial"):
            if key in have:
                where = "sweep" if key in suite.sweep else "params"
                raise c.fail(f"{where}.{key}", "is for a generated catalogue (workload.catalogue is the "
                                               f"folder {suite.workload.catalogue})")


def _check_kind_params(c: Checker, suite: Suite) -> None:
    """Parameters of the other workload kinds are refused; micro-batches must divide the batch."""
    kind = suite.workload.kind
    training = kind == "training"
    own = _kind_params(kind)
    sources = [("params", {k: [v] for k, v in suite.params.items()}), ("sweep", suite.sweep)]
    sources += [(f"placements.{n}.params", {k: [v] for k, v in pp.items()})
                for n, pp in suite.placement_params.items()]
    for where, values in sources:
        for k, vals in values.items():
            if k in PARAMS and k not in own:
                raise c.fail(f"{where}.{k}", f"is not a parameter of a {kind} workload")
            if k == "micro_batches" and training:
                for v in vals:
                    if suite.workload.batch % v:
                        raise c.fail(f"{where}.{k}",
                                     f"must divide workload.batch ({suite.workload.batch}) (got {v})")
    if training:
        _check_training_data(c, suite)
    if kind == "caching":
        _check_caching_params(c, suite)


def _check_training_data(c: Checker, suite: Suite) -> None:
    """``workload.data``: one file per device or one for all, for every device count of the suite."""
    files = len(suite.workload.data)
    if "devices" in suite.sweep:
        counts = [(f"sweep.devices[{i}]", n) for i, n in enumerate(suite.sweep["devices"])]
    elif "devices" in suite.params:
        counts = [("params.devices", suite.params["devices"])]
    else:
        counts = [("workload.devices", suite.workload.devices)]
    counts += [(f"placements.{n}.params.devices", pp["devices"])
               for n, pp in suite.placement_params.items() if "devices" in pp]
    for where, n in counts:
        problem = corpora.count_problem(files, n)
        if problem:
            raise c.fail("workload.data", f"{problem} ({where} is {n}) {got(suite.workload.data)}")
