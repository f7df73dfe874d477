"""Replay mode: the caching policies on a recorded workload, with delivery times from the analytic model.

The same :class:`~testbed.apps.caching.policies.Policy` objects and the same request sequence as an
emulated run, so hits and misses are the same for the same seed; only the time a fetch takes comes from
:mod:`testbed.apps.caching.analytic` instead of real bytes on emulated links.  Missing units come from
the nearest connected edge that holds them, else from the repository; proactive re-placements are
prefetched the same way, off the request path (their bytes are counted, their time is not).

Public API: ``Metrics`` (accumulates the item-7 fields, shared with the emulated run), ``replay``,
``sources`` (where each missing unit comes from), ``run_replay`` (the ``cache-run --replay`` command).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testbed.apps.caching.analytic import AnalyticModel, CacheNetwork, framing_bytes
from testbed.apps.caching.policies import DEFAULT_WINDOW, Plan, Policy, Units, make_policy, units_of
from testbed.apps.caching.workload import Request, WorkloadSpec, digest, generate


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


QUANTILE_STEP = 0.5  # percent between two points of ``ttft_ms_quantiles`` (a CDF of bounded size)


def quantiles(values: Sequence[float], step: float = QUANTILE_STEP) -> list[float]:
    """The 0th, ``step``-th, ... 100th percentiles of ``values``: a run's distribution in a fixed number of
    figures whatever its number of requests (suites record it for the TTFT CDF)."""
    if not len(values):
        return []
    qs = np.linspace(0.0, 100.0, int(round(100 / step)) + 1)
    return [round(float(v), 3) for v in np.percentile(values, qs)]


@dataclass
class Metrics:
    """The ``cache-run --json`` fields, filled request by request (replay and emulated alike)."""

    policy: str
    mode: str
    units: Units
    requests: int = 0
    hits: int = 0
    present_bytes: int = 0
    requested_bytes: int = 0
    backhaul_bytes: int = 0
    edge_to_edge_bytes: int = 0
    prefetch_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    handovers: int = 0
    fetch_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    goodput_mbit: list[float] = field(default_factory=list)
    hit_per_request: list[bool] = field(default_factory=list)

    def request(self, req: Request, plan: Plan, model_bytes: int, fetch_ms: float | None,
                ttft_ms: float) -> None:
        self.requests += 1
        self.hits += plan.hit
        self.hit_per_request.append(plan.hit)
        self.handovers += req.handover
        self.present_bytes += plan.present_bytes
        self.requested_bytes += model_bytes
        if fetch_ms is not None:
            self.fetch_ms.append(fetch_ms)
        self.ttft_ms.append(ttft_ms)

    def moved(self, nbytes: int, from_edge: bool, ms: float | None, prefetch: bool = False) -> None:
        """Bytes delivered from one source (a neighbouring edge or the repository) in ``ms``."""
        if from_edge:
            self.edge_to_edge_bytes += nbytes
        else:
            self.backhaul_bytes += nbytes
        if prefetch:
            self.prefetch_bytes += nbytes
        if ms and ms > 0 and nbytes > 0:
            self.goodput_mbit.append(nbytes * 8 / (ms * 1e3))

    def evicted(self, units: Sequence[int]) -> None:
        self.evictions += sum(len(self.units.unit_blocks[u]) for u in units)
        self.evicted_bytes += self.units.bytes_of(units)

    def result(self, policy: Policy, generated_variants: int, **extra: Any) -> dict[str, Any]:
        f, t = self.fetch_ms, self.ttft_ms
        return {
            "policy": self.policy, "mode": self.mode, "requests": self.requests,
            "hit_ratio": round(self.hits / self.requests, 6) if self.requests else None,
            "byte_hit_ratio": round(self.present_bytes / self.requested_bytes, 6) if self.requested_bytes
            else None,
            "backhaul_bytes": self.backhaul_bytes, "edge_to_edge_bytes": self.edge_to_edge_bytes,
            "prefetch_bytes": self.prefetch_bytes,
            "fetches": len(f),
            "fetch_ms_mean": round(float(np.mean(f)), 3) if f else None,
            "fetch_ms_p50": _pct(f, 50), "fetch_ms_p95": _pct(f, 95),
            "ttft_ms_p50": _pct(t, 50), "ttft_ms_p95": _pct(t, 95), "ttft_ms_p99": _pct(t, 99),
            "storage_used_bytes": {e: policy.used_bytes(e) for e in policy.edges},
            "capacity_bytes": policy.capacity,
            "evictions": self.evictions, "evicted_bytes": self.evicted_bytes,
            "delivery_goodput_mbit": round(float(np.mean(self.goodput_mbit)), 3) if self.goodput_mbit
            else None,
            "handovers": self.handovers,
            "generated_variants": generated_variants,
            **extra,
        }


def sources(net: CacheNetwork, policy: Policy, edge: str,
            units: Sequence[int]) -> dict[str | None, list[int]]:
    """Where each unit comes from: the nearest connected edge holding it, else ``None`` (the repository)."""
    out: dict[str | None, list[int]] = {}
    left = set(units)
    for p in net.peers(edge):
        if not left:
            break
        got = left & policy.present(p)
        if got:
            out[p] = [u for u in units if u in got]  # keep the plan's order
            left -= got
    if left:
        out[None] = [u for u in units if u in left]
    return out


def unit_framing(units: Units, block_sizes: Mapping[str, int] | None) -> list[int]:
    """Each unit's framing bytes on the wire (``analytic.framing_bytes`` of its blocks; zeros without
    the blocks' sizes)."""
    if block_sizes is None:
        return [0] * len(units.us)
    return [sum(framing_bytes(block_sizes[h]) for h in blocks) for blocks in units.unit_blocks]


def _deliver(net: CacheNetwork, model: AnalyticModel, policy: Policy, metrics: Metrics, edge: str,
             units: Sequence[int], prefetch: bool, framing: Sequence[int]) -> float:
    """Account one delivery; its analytic time (the slowest of its parallel sources)."""
    slowest = 0.0
    for src, us in sources(net, policy, edge, units).items():
        nbytes = policy.u.bytes_of(us)
        path = net.repo_path[edge] if src is None else net.peer_path[(src, edge)]
        ms = model.fetch_ms(nbytes, path, sum(framing[u] for u in us))
        metrics.moved(nbytes, src is not None, ms, prefetch)
        slowest = max(slowest, ms)
    return slowest


def replay(units: Units, net: CacheNetwork, policy: Policy, requests: Sequence[Request],
           model: AnalyticModel | None = None, generated_variants: int = 0,
           ttft_quantiles: bool = False, block_sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Run ``policy`` over ``requests``; the item-7 fields with ``mode: replay`` (and with
    ``ttft_quantiles``, the TTFT distribution as ``ttft_ms_quantiles``, see ``quantiles``).
    ``block_sizes`` (a catalogue's): count the protocol's framing of each block on the wire."""
    model = model or AnalyticModel()
    framing = unit_framing(units, block_sizes)
    metrics = Metrics(policy.name, "replay", units)
    start = time.perf_counter()
    for req in requests:
        # sources are looked up before the policy changes this edge's store (peers are unaffected)
        plan = policy.request(req.edge, req.model)
        metrics.evicted(plan.evict)
        fetch = (_deliver(net, model, policy, metrics, req.edge, plan.fetch, False, framing)
                 if plan.fetch else None)
        mbytes = units.mb[units.index[req.model]]
        ttft = model.ttft_ms(fetch or 0.0, mbytes, net.device_path[req.device])
        metrics.request(req, plan, mbytes, fetch, ttft)
        for edge, p in policy.placement().items():
            metrics.evicted(p.evict)
            if p.fetch:
                _deliver(net, model, policy, metrics, edge, p.fetch, True, framing)
    extra = {"ttft_ms_quantiles": quantiles(metrics.ttft_ms)} if ttft_quantiles else {}
    return metrics.result(policy, generated_variants, wall_s=round(time.perf_counter() - start, 3), **extra)


def workload_for(catalogue, net: CacheNetwork, zipf: float, requests: int, mobility: float, seed: int,
                 rate_per_s: float = 10.0) -> WorkloadSpec:
    """The workload spec of a run on ``net`` over the catalogue's models."""
    cells = tuple((e, tuple(net.cells[e])) for e in net.edges)
    return WorkloadSpec(models=tuple(catalogue.models), cells=cells,
                        zipf=zipf, requests=requests, mobility=mobility, seed=seed, rate_per_s=rate_per_s)


def run_replay(catalogue, net: CacheNetwork, policy_name: str, capacity_bytes: int, zipf: float,
               requests: int, mobility: float, seed: int, window: int = DEFAULT_WINDOW,
               model: AnalyticModel | None = None, ttft_quantiles: bool = False) -> dict[str, Any]:
    """One replay run from its parameters (what ``cache-run --replay`` does after parsing)."""
    units = units_of(catalogue)
    policy = make_policy(policy_name, units, net.edges, capacity_bytes, seed=seed, window=window)
    spec = workload_for(catalogue, net, zipf, requests, mobility, seed)
    reqs = generate(spec)
    out = replay(units, net, policy, reqs, model, catalogue.generated_variants(), ttft_quantiles,
                 catalogue.block_sizes)
    out.update({"models": len(catalogue.models), "edges": len(net.edges), "zipf": zipf, "mobility": mobility,
                "seed": seed, "window": window, "catalogue_synthetic": bool(catalogue.synthetic),
                "workload_digest": digest(reqs)})
    return out
