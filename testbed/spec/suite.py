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
    repeats: 1
    shaper: auto
    energy: {compute_w: 2.5, tx_nj_per_bit: 100}

Parameters (in ``params`` or ``sweep``): see ``PARAMS``; besides those,
``links.A-B.up.FIELD`` / ``links.A-B.down.FIELD`` set one direction of the link
written ``between: [A, B]`` and ``nodes.N.FIELD`` sets a node field.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.spec.errors import SpecError

BASELINES = ("on-device", "edge-offload", "cloud-offload")
SHAPERS = ("auto", "kernel", "userspace")
QUANTS = ("none", "bf16", "int8", "int4")
CODECS = ("fp32", "fp16", "bf16", "int8")
RUNTIMES = ("process", "docker")

# Parameter name -> one-line meaning.  Network parameters act on every device's access link.
PARAMS: dict[str, str] = {
    "uplink_mbit": "device -> first hop bandwidth (Mbit/s)",
    "downlink_mbit": "first hop -> device bandwidth (Mbit/s)",
    "delay_ms": "one-way propagation delay of the access link, both directions (ms)",
    "loss_pct": "random loss of the access link, both directions (%)",
    "trace": "channel trace for the access link (a file, or a base name with .up/.down files)",
    "cut": "cut layer substituted for {cut} in split placements",
    "quant": "weight quantization of every shard",
    "codec": "activation codec on the wire",
    "kv_cache": "KV cache on (true) or off (false)",
    "device_cpu": "CPU share of one core for every device node",
    "runtime": "node runtime (process | docker)",
    "prompt": "prompt id from the prompt set (default: every prompt in the set)",
    "max_new_tokens": "tokens generated per request",
    "devices": "devices running sessions in parallel against the same edge",
}
NETWORK_PARAMS = ("uplink_mbit", "downlink_mbit", "delay_ms", "loss_pct", "trace")
TOP_KEYS = {"name", "description", "topology", "model", "roles", "workload", "baselines", "placements",
            "params", "sweep", "repeats", "shaper", "energy", "analytic"}
WORKLOAD_KEYS = {"prompts", "max_new_tokens", "devices"}
ENERGY_KEYS = {"compute_w", "idle_w", "tx_nj_per_bit", "rx_nj_per_bit"}
ANALYTIC_KEYS = {"band"}
_LINK_PARAM = re.compile(r"^links\.([A-Za-z][A-Za-z0-9]*)-([A-Za-z][A-Za-z0-9]*)\.(up|down)\."
                         r"(bw_mbit|delay_ms|jitter_ms|loss_pct|queue_pkts|trace|format)$")
_NODE_PARAM = re.compile(r"^nodes\.([A-Za-z][A-Za-z0-9]*)\.(cpu|memory_mb|runtime)$")
_PLACEMENT_VARS = re.compile(r"\{([a-z_]+)\}")


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


def _err(src: Path, fld: str, msg: str) -> SpecError:
    return SpecError(src, fld, msg)


def _read_yaml(path: Path, src: Path, fld: str) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise _err(src, fld, f"cannot read {path}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise _err(path, "yaml", f"syntax error{where}: {getattr(e, 'problem', e)}") from None


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(os.path.expandvars(value)))
    return p if p.is_absolute() else (base / p).resolve()


def _positive_int(src: Path, fld: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _err(src, fld, f"must be an integer >= {minimum} (got {v!r})")
    return v


def _number(src: Path, fld: str, v: Any, *, gt: float | None = None, ge: float | None = None,
            le: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(src, fld, f"must be a number (got {v!r})")
    if gt is not None and not v > gt:
        raise _err(src, fld, f"must be > {gt:g} (got {v!r})")
    if ge is not None and not v >= ge:
        raise _err(src, fld, f"must be >= {ge:g} (got {v!r})")
    if le is not None and not v <= le:
        raise _err(src, fld, f"must be <= {le:g} (got {v!r})")
    return float(v)


def load_prompts(path: Path, src: Path, fld: str) -> dict[str, str]:
    """A prompt set file: ``prompts: [{id: ..., text: ...}, ...]``."""
    data = _read_yaml(path, src, fld)
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data["prompts"]:
        raise _err(path, "prompts", "must be a non-empty list of {id, text}")
    out: dict[str, str] = {}
    for i, p in enumerate(data["prompts"]):
        if not isinstance(p, dict) or set(p) != {"id", "text"}:
            raise _err(path, f"prompts[{i}]", f"must have exactly the keys id and text (got {p!r})")
        pid, text = str(p["id"]), p["text"]
        if not isinstance(text, str) or not text.strip():
            raise _err(path, f"prompts[{i}].text", "must be a non-empty string")
        if pid in out:
            raise _err(path, f"prompts[{i}].id", f"duplicate id {pid!r}")
        out[pid] = text
    return out


def check_param(src: Path, fld: str, name: str, value: Any, suite: Suite) -> Any:
    """Validate one parameter value; return it normalized (trace paths made absolute)."""
    base = suite.source.resolve().parent
    if name in ("uplink_mbit", "downlink_mbit"):
        return _number(src, fld, value, gt=0)
    if name in ("delay_ms",):
        return _number(src, fld, value, ge=0)
    if name == "loss_pct":
        return _number(src, fld, value, ge=0, le=100)
    if name == "trace":
        if not isinstance(value, str) or not value:
            raise _err(src, fld, f"must be a trace path (got {value!r})")
        p = _resolve(base, value)
        if not p.is_file() and not (Path(f"{p}.up").is_file() and Path(f"{p}.down").is_file()):
            raise _err(src, fld, f"no such trace file (or .up/.down pair): {p}")
        return str(p)
    if name == "cut":
        return _positive_int(src, fld, value)
    if name == "quant":
        if value not in QUANTS:
            raise _err(src, fld, f"must be one of {', '.join(QUANTS)} (got {value!r})")
        return value
    if name == "codec":
        if value not in CODECS:
            raise _err(src, fld, f"must be one of {', '.join(CODECS)} (got {value!r})")
        return value
    if name == "kv_cache":
        if not isinstance(value, bool):
            raise _err(src, fld, f"must be true or false (got {value!r})")
        return value
    if name == "device_cpu":
        return _number(src, fld, value, gt=0)
    if name == "runtime":
        if value not in RUNTIMES:
            raise _err(src, fld, f"must be one of {', '.join(RUNTIMES)} (got {value!r})")
        return value
    if name == "prompt":
        if str(value) not in suite.workload.prompts:
            known = ", ".join(suite.workload.prompts)
            raise _err(src, fld, f"unknown prompt id {value!r} (the prompt set has {known})")
        return str(value)
    if name in ("max_new_tokens", "devices"):
        return _positive_int(src, fld, value)
    m = _LINK_PARAM.match(name)
    if m:
        a, b, _direction, what = m.groups()
        links = suite.topology_data["links"]
        if not any(sorted(link.get("between", [])) == sorted([a, b]) for link in links):
            raise _err(src, fld, f"no link between {a} and {b} in {suite.topology_path}")
        if what == "trace":
            return check_param(src, fld, "trace", value, suite)
        return value  # the topology parser validates the value when the point is built
    m = _NODE_PARAM.match(name)
    if m:
        if m.group(1) not in suite.topology_data["nodes"]:
            raise _err(src, fld, f"no node {m.group(1)!r} in {suite.topology_path}")
        return value
    raise _err(src, fld, f"unknown parameter {name!r} (known: {', '.join(PARAMS)}, "
               "links.A-B.up|down.FIELD, nodes.N.FIELD)")


def _roles(src: Path, data: Any, topo: dict[str, Any]) -> dict[str, str]:
    nodes = topo.get("nodes") or {}
    by_role: dict[str, list[str]] = {}
    for name, spec in nodes.items():
        by_role.setdefault((spec or {}).get("role", ""), []).append(name)
    roles: dict[str, str] = {}
    given = data or {}
    if not isinstance(given, dict):
        raise _err(src, "roles", f"must be a mapping of device/edge/cloud to node names (got {given!r})")
    for key in given:
        if key not in ("device", "edge", "cloud"):
            raise _err(src, f"roles.{key}", "unknown role (known: device, edge, cloud)")
    for role in ("device", "edge", "cloud"):
        if role in given:
            if given[role] not in nodes:
                raise _err(src, f"roles.{role}", f"no node {given[role]!r} in the topology")
            roles[role] = given[role]
        elif by_role.get(role):
            roles[role] = by_role[role][0]
    for role in ("device", "edge"):
        if role not in roles:
            raise _err(src, f"roles.{role}", f"the topology has no {role} node; name one")
    return roles


def load_suite(path: str | Path, sets: list[str] | None = None) -> Suite:
    """Read and validate a suite file; raise SpecError with a one-line message on bad input."""
    src = Path(path)
    data = _read_yaml(src, src, "file")
    if not isinstance(data, dict):
        raise _err(src, "file", "must be a mapping")
    suite = parse_suite(apply_sets(data, sets or [], src), src)
    suite.sets = list(sets or [])
    return suite


def apply_sets(data: dict[str, Any], sets: list[str], src: Path) -> dict[str, Any]:
    """Apply command-line overrides ``KEY[.NAME]=YAML_VALUE`` (``model=tiny``, ``sweep.cut=[4,8]``)."""
    out = dict(data)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise _err(src, "--set", f"must be KEY=VALUE (got {item!r})")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise _err(src, f"--set {key}", f"value is not valid YAML: {raw!r}") from None
        top, dot, sub = key.partition(".")  # params.links.a-b.up.bw_mbit: the rest is one name
        if dot:
            child = out.get(top)
            out[top] = {**(child if isinstance(child, dict) else {}), sub: value}
        else:
            out[top] = value
    return out


def parse_suite(data: dict[str, Any], src: Path) -> Suite:
    for key in data:
        if key not in TOP_KEYS:
            raise _err(src, key, f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    base = src.resolve().parent
    name = data.get("name") or src.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _err(src, "name", f"must be letters, digits, '-', '_' or '.' (got {name!r})")
    if "topology" not in data or not isinstance(data["topology"], str):
        raise _err(src, "topology", "required: the topology file")
    topo_path = _resolve(base, data["topology"])
    topo_data = _read_yaml(topo_path, src, "topology")
    if not isinstance(topo_data, dict) or not isinstance(topo_data.get("nodes"), dict) \
            or not isinstance(topo_data.get("links"), list):
        raise _err(src, "topology", f"{topo_path} is not a topology file (needs nodes and links)")
    # Validate the topology as given (A's parser gives field-level errors naming that file).
    from testbed.spec.topology import parse_topology

    parse_topology(topo_data, topo_path)

    model = data.get("model", "default")
    if not isinstance(model, str) or not model:
        raise _err(src, "model", f"must be default, tiny or a path (got {model!r})")
    if model not in ("default", "tiny"):
        mp = _resolve(base, model)
        if not mp.exists():
            raise _err(src, "model", f"no such checkpoint: {mp}")
        model = str(mp)

    roles = _roles(src, data.get("roles"), topo_data)
    wl = data.get("workload")
    if not isinstance(wl, dict):
        raise _err(src, "workload", "required: {prompts, max_new_tokens, devices}")
    for key in wl:
        if key not in WORKLOAD_KEYS:
            raise _err(src, f"workload.{key}", f"unknown key (known: {', '.join(sorted(WORKLOAD_KEYS))})")
    if not isinstance(wl.get("prompts"), str):
        raise _err(src, "workload.prompts", "required: a prompt set file")
    pfile = _resolve(base, wl["prompts"])
    workload = Workload(
        prompts_file=pfile,
        prompts=load_prompts(pfile, src, "workload.prompts"),
        max_new_tokens=_positive_int(src, "workload.max_new_tokens", wl.get("max_new_tokens", 16)),
        devices=_positive_int(src, "workload.devices", wl.get("devices", 1)),
    )

    baselines = data.get("baselines", list(BASELINES))
    if not isinstance(baselines, list):
        raise _err(src, "baselines", f"must be a list of {', '.join(BASELINES)} (got {baselines!r})")
    for i, b in enumerate(baselines):
        if b not in BASELINES:
            raise _err(src, f"baselines[{i}]", f"must be one of {', '.join(BASELINES)} (got {b!r})")
    if "cloud-offload" in baselines and "cloud" not in roles:
        raise _err(src, "baselines", "cloud-offload needs a cloud node (roles.cloud)")

    placements = data.get("placements") or {}
    if not isinstance(placements, dict):
        raise _err(src, "placements", "must map names to placement strings like 'phone=0:{cut},mec={cut}:30'")
    for pname, tmpl in placements.items():
        fld = f"placements.{pname}"
        if pname in BASELINES:
            raise _err(src, fld, "name is reserved for a baseline")
        if not isinstance(tmpl, str) or "=" not in tmpl:
            raise _err(src, fld, f"must be a string like 'phone=0:{{cut}},mec={{cut}}:30' (got {tmpl!r})")
        for var in _PLACEMENT_VARS.findall(tmpl):
            if var not in ("cut", "layers"):
                raise _err(src, fld, f"unknown variable {{{var}}} (known: {{cut}}, {{layers}})")
        for part in tmpl.split(","):
            node = part.split("=", 1)[0].strip()
            if node not in topo_data["nodes"]:
                raise _err(src, fld, f"no node {node!r} in the topology")
    if not baselines and not placements:
        raise _err(src, "placements", "nothing to run: no baselines and no placements")

    repeats = _positive_int(src, "repeats", data.get("repeats", 3))
    shaper = data.get("shaper", "auto")
    if shaper not in SHAPERS:
        raise _err(src, "shaper", f"must be one of {', '.join(SHAPERS)} (got {shaper!r})")

    en = data.get("energy") or {}
    if not isinstance(en, dict):
        raise _err(src, "energy", "must be a mapping")
    for key in en:
        if key not in ENERGY_KEYS:
            raise _err(src, f"energy.{key}", f"unknown key (known: {', '.join(sorted(ENERGY_KEYS))})")
    energy = EnergyModel(**{k: _number(src, f"energy.{k}", v, ge=0) for k, v in en.items()})

    an = data.get("analytic") or {}
    if not isinstance(an, dict) or set(an) - ANALYTIC_KEYS:
        raise _err(src, "analytic", "only 'band: [low, high]' is known")
    band = an.get("band", [0.5, 2.0])
    if not (isinstance(band, list) and len(band) == 2 and all(isinstance(x, (int, float)) for x in band)
            and 0 < band[0] < band[1]):
        raise _err(src, "analytic.band", f"must be [low, high] with 0 < low < high (got {band!r})")

    suite = Suite(
        name=name, source=src, description=str(data.get("description", "")), topology_path=topo_path,
        topology_data=topo_data, model=model, roles=roles, workload=workload, baselines=list(baselines),
        placements=dict(placements), params={}, sweep_mode="cartesian", sweep={}, repeats=repeats,
        shaper=shaper, energy=energy, band=(float(band[0]), float(band[1])),
    )

    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise _err(src, "params", "must be a mapping of parameter -> value")
    suite.params = {k: check_param(src, f"params.{k}", k, v, suite) for k, v in params.items()}

    sweep = dict(data.get("sweep") or {})
    if not isinstance(data.get("sweep") or {}, dict):
        raise _err(src, "sweep", "must be a mapping of parameter -> list of values")
    mode = sweep.pop("mode", "cartesian")
    if mode not in ("cartesian", "zip"):
        raise _err(src, "sweep.mode", f"must be cartesian or zip (got {mode!r})")
    for k, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise _err(src, f"sweep.{k}", f"must be a non-empty list (got {values!r})")
        if k in suite.params:
            raise _err(src, f"sweep.{k}", "also set in params: set it in one place")
        suite.sweep[k] = [check_param(src, f"sweep.{k}[{i}]", k, v, suite) for i, v in enumerate(values)]
    if mode == "zip" and len({len(v) for v in suite.sweep.values()}) > 1:
        lens = ", ".join(f"{k}: {len(v)}" for k, v in suite.sweep.items())
        raise _err(src, "sweep", f"zip needs lists of equal length (got {lens})")
    suite.sweep_mode = mode
    uses_cut = any("{cut}" in t for t in placements.values())
    if uses_cut and "cut" not in suite.params and "cut" not in suite.sweep:
        raise _err(src, "placements", "a placement uses {cut}: set params.cut or sweep.cut")
    return suite
