"""One caching point of an experiment suite: a policy on a seeded workload, in replay or emulated mode.

The experiment runner (``testbed.experiments.runner``) hands each point of a ``kind: caching`` suite
here, as it hands a training point to ``testbed.apps.training.workload``.  The run is ``testbed
cache-run``'s own (``replay.run_replay``, or ``emulated.run_emulated``, which brings the point's
topology up itself), with the same parameter names; the record is its ``--json`` object plus the TTFT
distribution (``ttft_ms_quantiles``) that the reports draw as a CDF.

Repeats draw different workloads: repeat ``r`` uses seed ``seed + r`` (for the requests and for the
random policy), so the spread a report shows is that over workloads, not the noise of one.

The catalogue is a built one (a folder) or generated from ``{base, adapters, partial, seed,
shared_layers}``: manifests only (``synthetic_catalogue``: the real build's block sizes, nothing
written) when every point replays, or built once under the results folder (``catalogues/KEY``) when a
point is emulated, and then used by every point, so both modes see the same blocks.

Public API: ``CachePoint``, ``catalogue_for``, ``capacity_bytes``, ``check_point``, ``run_point``,
``summary``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from testbed.apps.caching.catalogue import (
    SMOLLM2_SHAPE,
    TINY_SHAPE,
    Catalogue,
    build_catalogue,
    load_catalogue,
    synthetic_catalogue,
)
from testbed.apps.caching.policies import OPTIMAL_MAX_MODELS, Units, units_of
from testbed.spec.errors import SpecError, got
from testbed.spec.topology import Topology

# the figures of a run that go to the record's ``metrics`` (what tables and plots read per repeat)
SUMMARY_KEYS = ("hit_ratio", "byte_hit_ratio", "backhaul_bytes", "edge_to_edge_bytes", "prefetch_bytes",
                "fetches", "fetch_ms_mean", "fetch_ms_p50", "fetch_ms_p95", "ttft_ms_p50", "ttft_ms_p95",
                "ttft_ms_p99", "evictions", "evicted_bytes", "delivery_goodput_mbit", "handovers",
                "capacity_bytes", "generated_variants", "models", "requests", "wall_s",
                "fetch_bound_ratio_mean", "tokens_generated")


@dataclass(frozen=True)
class CachePoint:
    """What a suite point asks of a caching run (the suite's parameter names)."""

    policy: str
    capacity_mb: float | None = None  # exactly one of capacity_mb and capacity_bases
    capacity_bases: float | None = None
    zipf: float = 0.8
    mobility: float = 0.0
    seed: int = 1  # of the first repeat; repeat r runs seed + r
    window: int = 200
    requests: int = 300
    cache_mode: str = "replay"

    @classmethod
    def of(cls, params: dict[str, Any]) -> CachePoint:
        return cls(**{k: params[k] for k in cls.__dataclass_fields__ if k in params})


def _generated_key(spec: dict[str, Any]) -> str:
    key = f"{spec['base']}-a{spec['adapters']}-p{spec['partial']}-s{spec['seed']}"
    return key + (f"-k{spec['shared_layers']}" if spec.get("shared_layers") is not None else "")


_SYNTHETIC: dict[str, Catalogue] = {}  # generated manifests by key: a suite asks for the same one often
_UNITS: dict[int, tuple[Catalogue, Units]] = {}  # by the catalogue's id (kept alive beside its units)


def catalogue_for(spec: str | dict[str, Any], work: Path, built: bool,
                  source: str | Path = "cache-run") -> Catalogue:
    """The catalogue of a point: ``spec`` is a built catalogue's folder, or a generated one's mapping
    (``base``, ``adapters``, ``partial``, ``seed``, ``shared_layers``), synthetic unless ``built`` (then
    built once under ``work/catalogues/KEY``).  A ``shared_layers`` the base does not have is a
    SpecError naming ``source``'s ``workload.catalogue.shared_layers``."""
    if isinstance(spec, str):
        return load_catalogue(spec)
    layers = (SMOLLM2_SHAPE if spec["base"] == "smollm2" else TINY_SHAPE)["layers"]
    k = spec.get("shared_layers")
    if k is not None and not 0 <= k < layers:
        raise SpecError(source, "workload.catalogue.shared_layers",
                        f"must be in 0..{layers - 1} (the {spec['base']} base has {layers} layers) {got(k)}")
    key = _generated_key(spec)
    args = (spec["adapters"], spec["partial"], spec["base"], spec["seed"], spec.get("shared_layers"))
    if not built:
        if key not in _SYNTHETIC:
            _SYNTHETIC[key] = synthetic_catalogue(*args)
        return _SYNTHETIC[key]
    root = work / "catalogues" / key
    if (root / "catalogue.json").is_file():  # built by an earlier point or run (a build is atomic)
        return load_catalogue(root)
    return build_catalogue(root, *args)


def base_bytes(cat: Catalogue) -> int:
    """The unit of ``capacity_bases``: the bytes of the catalogue's largest base (its fp32 one)."""
    return max(cat.model_bytes(b) for b in cat.bases())


def capacity_bytes(cat: Catalogue, point: CachePoint) -> int:
    if point.capacity_bases is not None:
        return int(point.capacity_bases * base_bytes(cat))
    if point.capacity_mb is None:
        raise ValueError("a caching point needs capacity_mb or capacity_bases")
    return int(point.capacity_mb * 1e6)


def check_point(cat: Catalogue, point: CachePoint, source: str | Path, fields: dict[str, str]) -> None:
    """SpecError (naming the suite's field in ``fields``, by parameter) for a point no run could do: a
    capacity below the largest model, the MILP on a catalogue too large for it."""
    cap = "capacity_bases" if point.capacity_bases is not None else "capacity_mb"
    if id(cat) not in _UNITS:  # a suite checks many points on the same catalogue
        _UNITS[id(cat)] = (cat, units_of(cat))
    units = _UNITS[id(cat)][1]
    i = int(np.argmax(units.model_bytes))  # the rule of the policies' own check_capacity, in the suite's unit
    need = int(units.model_bytes[i])
    if capacity_bytes(cat, point) < need:
        raise SpecError(source, fields.get(cap, f"params.{cap}"),
                        f"smaller than the largest model, {units.models[i]} ({need / 1e6:.2f} MB = "
                        f"{need / base_bytes(cat):.3f} bases) {got(getattr(point, cap))}")
    if point.policy == "optimal" and len(cat.models) > OPTIMAL_MAX_MODELS:
        raise SpecError(source, fields.get("policy", "params.policy"),
                        f"optimal solves a MILP and is for at most {OPTIMAL_MAX_MODELS} models; the "
                        f"catalogue has {len(cat.models)} {got('optimal')}")


def run_point(topo: Topology, cat: Catalogue, point: CachePoint, repeat: int, shaper: str = "auto",
              runtime: str | None = None, logs: Path | None = None) -> dict[str, Any]:
    """Run ``point``'s repeat ``repeat`` on ``topo`` (emulated: brought up here and torn down); the
    ``cache-run --json`` object with ``ttft_ms_quantiles``, ``repeat`` and ``capacity_bases``."""
    seed = point.seed + repeat
    cap = capacity_bytes(cat, point)
    common = {"zipf": point.zipf, "requests": point.requests, "mobility": point.mobility, "seed": seed,
              "window": point.window, "ttft_quantiles": True}
    if point.cache_mode == "emulated":
        from testbed.apps.caching.emulated import run_emulated

        out = run_emulated(topo, cat, point.policy, cap, shaper=shaper, runtime=runtime, logs=logs, **common)
    else:
        from testbed.apps.caching.analytic import cache_network
        from testbed.apps.caching.replay import run_replay

        out = run_replay(cat, cache_network(topo), point.policy, cap, **common)
    out["repeat"] = repeat
    out["capacity_bases"] = round(cap / base_bytes(cat), 6)
    return out


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The record's ``metrics``: the run's figures, and the storage summed over the edges."""
    m = {k: result[k] for k in SUMMARY_KEYS if k in result}
    m["storage_used_bytes"] = sum(result.get("storage_used_bytes", {}).values())
    return m
