"""Expand a suite into experiment points: placements x sweep (cartesian or zipped).

Parameters that cannot change a placement's outcome are dropped for it, so the
point is run once rather than once per value: the on-device baseline ignores
the network and the codec, the offload baselines ignore the codec and the cut,
a split placement without ``{cut}`` ignores the cut.  Reports draw such a
point as a constant across the swept axis.

A point id names the placement and the swept values (``split/uplink_mbit=10,cut=8``);
file paths show by file name.  Two values that would show alike (``a/lte.up`` and
``b/lte.up``) get as many parent folders as tell them apart (a short hash where no
folder does), so no two points share an id; values that do not collide keep the short
form, so ids of suites without such values do not change.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.spec.suite import NETWORK_PARAMS, Suite
from testbed.spec.topology import Topology, parse_topology

DEFAULTS: dict[str, Any] = {"quant": "none", "codec": "fp32", "kv_cache": True}
PROACTIVE_POLICIES = ("trimcaching", "optimal")  # the caching policies that use ``window``
CACHING_DEFAULTS: dict[str, Any] = {"zipf": 0.8, "mobility": 0.0, "seed": 1, "window": 200,
                                    "cache_mode": "replay"}  # cache-run's defaults
TRAINING_DEFAULTS: dict[str, Any] = {"codec": "fp32", "grad_codec": "fp32", "scheme": "sl",
                                     "schedule": "gpipe", "micro_batches": 1, "freeze_client": 0.0,
                                     "freeze_server": 0.0, "head_on_device": False}


@dataclass(frozen=True)
class Point:
    """One configuration to run (``repeats`` times)."""

    id: str
    placement_name: str
    kind: str  # "on-device" | "edge-offload" | "cloud-offload" | "split" | "caching"
    placement: str  # resolved, e.g. "phone=0:8,mec=8:30"; a caching point: its policy
    params: dict[str, Any] = field(hash=False)  # every effective parameter value
    swept: tuple[str, ...] = ()  # the parameter names that vary in this suite
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # swept value as the id shows it

    def matches(self, only: str | None) -> bool:
        """``--only``: comma-separated terms, each ``key=value`` or a substring of the point id."""
        if not only:
            return True
        for term in (t.strip() for t in only.split(",")):
            if not term:
                continue
            key, sep, value = term.partition("=")
            if sep:
                if key == "placement":
                    have = self.placement_name
                elif key == "kind":
                    have = self.kind
                else:
                    have = self.params.get(key)
                shown = {_fmt(have), str(have).lower(), label_value(have), self.labels.get(key)}
                if have is None or value.lower() not in shown:
                    return False
            elif term not in self.id:
                return False
        return True


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def baseline_placement(kind: str, roles: dict[str, str], layers: int) -> str:
    """Placement strings of the baselines.  ``dev=0:0`` = the device runs the driver but no layer."""
    dev = roles["device"]
    if kind == "on-device":
        return f"{dev}=0:{layers}"
    if kind == "edge-offload":
        return f"{dev}=0:0,{roles['edge']}=0:{layers}"
    if kind == "cloud-offload":
        return f"{dev}=0:0,{roles['cloud']}=0:{layers}"
    raise ValueError(kind)


def irrelevant(kind: str, template: str) -> set[str]:
    """Parameters that do not affect a placement of this kind (for caching, ``template`` is the policy:
    only the proactive ones re-place every ``window`` requests)."""
    if kind == "caching":
        return set() if template in PROACTIVE_POLICIES else {"window"}
    if kind == "on-device":
        return {*NETWORK_PARAMS, "codec", "cut"}
    if kind in ("edge-offload", "cloud-offload"):
        return {"codec", "cut"}
    return set() if "{cut}" in template else {"cut"}


def _combos(suite: Suite) -> list[dict[str, Any]]:
    keys = list(suite.sweep)
    if not keys:
        return [{}]
    if suite.sweep_mode == "zip":
        return [dict(zip(keys, vals, strict=True)) for vals in zip(*suite.sweep.values(), strict=True)]
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*suite.sweep.values())]


def _value_key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def value_labels(values: list[Any]) -> dict[str, str]:
    """Distinct labels for one parameter's values, keyed by ``_value_key``.

    Each value shows as ``label_value`` unless another value shows alike: then paths
    show with as many parent folders as tell the colliding ones apart, and anything
    still alike gets ``~`` and a short hash of the value.
    """
    distinct = {_value_key(v): v for v in values}
    labels = {k: label_value(v) for k, v in distinct.items()}
    groups: dict[str, list[str]] = {}
    for k, lab in labels.items():
        groups.setdefault(lab, []).append(k)
    for keys in (g for g in groups.values() if len(g) > 1):
        parts = {k: Path(str(distinct[k])).parts for k in keys}
        if all(len(p) > 1 and "/" in str(distinct[k]) for k, p in parts.items()):
            for depth in range(2, max(len(p) for p in parts.values()) + 1):
                tails = {k: "/".join(p[-depth:]) for k, p in parts.items()}
                if len(set(tails.values())) == len(tails):
                    labels.update(tails)
                    break
        shown: dict[str, int] = {}
        for k in keys:
            shown[labels[k]] = shown.get(labels[k], 0) + 1
        for k in keys:
            if shown[labels[k]] > 1:
                labels[k] += "~" + hashlib.sha1(k.encode()).hexdigest()[:6]
    return labels


def expand(suite: Suite, layers: int) -> list[Point]:
    """All points of a suite, in run order (sweep combination outer, placement inner), deduplicated."""
    combos = _combos(suite)
    swept = list(suite.sweep)
    prompts = list(suite.workload.prompts)
    if prompts and "prompt" not in suite.sweep and "prompt" not in suite.params and len(prompts) > 1:
        combos = [{**c, "prompt": p} for c in combos for p in prompts]
        swept.append("prompt")
    pinned = suite.placement_params  # a placement's own values override the sweep's at its points
    names = {k: value_labels([c[k] for c in combos if k in c] + [pp[k] for pp in pinned.values() if k in pp])
             for k in swept}
    kinds = [(b, b, "") for b in suite.baselines] + [(n, "split", t) for n, t in suite.placements.items()]
    caching = suite.workload.kind == "caching"
    if caching:  # one "placement" per point: its policy, which names the point (lru/capacity_bases=2)
        swept = [k for k in swept if k != "policy"]
    points: list[Point] = []
    seen: dict[str, dict[str, Any]] = {}
    for combo in combos:
        if caching:
            policy = {**suite.params, **combo}["policy"]
            kinds = [(policy, "caching", policy)]
        for name, kind, template in kinds:
            drop = irrelevant(kind, template)
            params: dict[str, Any] = {**workload_defaults(suite), **suite.params, **combo,
                                      **pinned.get(name, {})}
            params = {k: v for k, v in params.items() if k not in drop}
            if kind == "caching":
                placement = name
            elif kind == "split":
                placement = template.replace("{layers}", str(layers))
                if "cut" in params:
                    placement = placement.replace("{cut}", str(params["cut"]))
            else:
                placement = baseline_placement(kind, suite.roles, layers)
            labels = {k: names[k][_value_key(params[k])] for k in swept if k in params}
            pid = name + ("/" + ",".join(f"{k}={v}" for k, v in labels.items()) if labels else "")
            if pid in seen:  # the same point again (a parameter it ignores varied): run it once
                if seen[pid] != params:
                    raise ValueError(f"two different points would share the id {pid!r}")
                continue
            seen[pid] = params
            points.append(Point(pid, name, kind, placement, params, tuple(swept), labels))
    return points


def workload_defaults(suite: Suite) -> dict[str, Any]:
    """Every point's parameters before the suite's own: the workload's figures and the defaults."""
    wl = suite.workload
    if wl.kind == "caching":
        generated = wl.catalogue if isinstance(wl.catalogue, dict) else {}
        return {**CACHING_DEFAULTS, "requests": wl.requests,
                **{k: generated[k] for k in ("adapters", "partial") if k in generated}}
    if wl.kind == "training":
        return {**TRAINING_DEFAULTS, "steps": wl.steps, "batch": wl.batch, "seq": wl.seq,
                "devices": wl.devices}
    return {**DEFAULTS, "prompt": next(iter(wl.prompts)), "max_new_tokens": wl.max_new_tokens,
            "devices": wl.devices}


def label_value(v: Any) -> str:
    """A parameter value as point ids and plot labels show it (on/off, 10 not 10.0, file names)."""
    s = _fmt(v)
    return Path(s).name if "/" in s else s


def device_nodes(suite: Suite, n: int) -> list[str]:
    """The first ``n`` device nodes: the suite's device first, then other device-role nodes in file order."""
    nodes = suite.topology_data["nodes"]
    others = [k for k, v in nodes.items() if (v or {}).get("role") == "device" and k != suite.roles["device"]]
    devs = [suite.roles["device"], *others]
    if n > len(devs):
        raise ValueError(f"{n} devices requested but the topology has {len(devs)}")
    return devs[:n]


def _access_links(data: dict[str, Any], device: str) -> list[tuple[dict[str, Any], str, str]]:
    """(link, uplink direction key, downlink direction key) for each link touching ``device``."""
    out = []
    for link in data["links"]:
        a, b = link["between"]
        if a == device:
            out.append((link, "up", "down"))
        elif b == device:
            out.append((link, "down", "up"))
    return out


def _set_trace(direction: dict[str, Any], path: str) -> None:
    direction.pop("bw_mbit", None)
    direction.pop("format", None)
    direction["trace"] = path


def topology_data(suite: Suite, point: Point) -> dict[str, Any]:
    """The topology YAML data with the point's parameters applied."""
    data = copy.deepcopy(suite.topology_data)
    p = point.params
    for dev in device_nodes(suite, p.get("devices", 1)):
        for link, up, down in _access_links(data, dev):
            for key in (up, down):
                link[key] = dict(link.get(key) or {})
            if "uplink_mbit" in p:
                link[up]["bw_mbit"] = p["uplink_mbit"]
                link[up].pop("trace", None)
            if "downlink_mbit" in p:
                link[down]["bw_mbit"] = p["downlink_mbit"]
                link[down].pop("trace", None)
            for key in ("delay_ms", "loss_pct"):
                if key in p:
                    link[up][key] = link[down][key] = p[key]
                    if key == "delay_ms":
                        for d in (up, down):
                            if link[d].get("jitter_ms", 0) > p[key]:
                                link[d]["jitter_ms"] = p[key]
            if "trace" in p:
                t = Path(p["trace"])
                if t.is_file():
                    _set_trace(link[up], str(t))
                    _set_trace(link[down], str(t))
                else:
                    _set_trace(link[up], f"{t}.up")
                    _set_trace(link[down], f"{t}.down")
        if "device_cpu" in p:
            data["nodes"][dev] = {**(data["nodes"][dev] or {}), "cpu": p["device_cpu"]}
    for key, value in p.items():
        parts = key.split(".")
        if parts[0] == "links":
            a, b = parts[1].split("-")
            for link in data["links"]:
                if link["between"] == [a, b] or link["between"] == [b, a]:
                    d = parts[2] if link["between"] == [a, b] else ("down" if parts[2] == "up" else "up")
                    link[d] = {**(link.get(d) or {}), parts[3]: value}
                    if parts[3] == "trace":
                        link[d].pop("bw_mbit", None)
        elif parts[0] == "nodes":
            data["nodes"][parts[1]] = {**(data["nodes"][parts[1]] or {}), parts[2]: value}
    if "trace_start_s" in p:  # every traced direction starts that far into its trace
        for link in data["links"]:
            for d in ("up", "down"):
                if (link.get(d) or {}).get("trace") is not None:
                    link[d] = {**link[d], "trace_start_s": p["trace_start_s"]}
    if "events" in p:  # the point's events replace the topology's
        data["events"] = point_events(p["events"])
    return data


def point_events(value: Any) -> list[Any]:
    """A point's ``events`` parameter as a list: written inline, or the list in an events file."""
    if not isinstance(value, str):
        return copy.deepcopy(value)
    from testbed.spec.yamlfile import load_yaml

    data = load_yaml(value)
    return data.get("events") or [] if isinstance(data, dict) else data


def build_topology(suite: Suite, point: Point) -> Topology:
    """The point's topology, validated by the topology parser (its errors name the topology file)."""
    return parse_topology(topology_data(suite, point), suite.topology_path)
