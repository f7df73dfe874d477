"""The request workload of a caching run: seeded, recorded, the same in emulated and replay mode.

* Popularity: Zipf with exponent ``zipf`` over a seeded ranking of the catalogue's models
  (p(rank k) ~ k^-zipf).  Each cell sees that ranking with a share ``cell_skew`` of its positions
  shuffled among themselves, so popularity differs per cell while staying Zipf-shaped.
* Devices: each request comes from a device drawn uniformly; it goes to the edge of the device's current
  cell.  After the request the device hands over to another cell (drawn uniformly) with probability
  ``mobility``; its next requests go to the new edge.
* Arrivals: Poisson, ``rate_per_s`` requests per second in total (exponential gaps).

The same :class:`WorkloadSpec` gives the same list of :class:`Request` every time (one numpy PCG64
stream seeded with ``seed``); ``save``/``load`` record it as JSON so a run can be replayed exactly.

Public API: ``WorkloadSpec``, ``Request``, ``generate``, ``popularity``, ``digest``, ``save``, ``load``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from testbed.files import write_atomic
from testbed.spec.errors import SpecError, got

FORMAT = "edgellm-cache-workload/1"


@dataclass(frozen=True)
class WorkloadSpec:
    models: tuple[str, ...]
    cells: tuple[tuple[str, tuple[str, ...]], ...]  # (edge, its devices), in topology order
    zipf: float = 0.8
    requests: int = 300
    mobility: float = 0.0
    seed: int = 1
    rate_per_s: float = 10.0
    cell_skew: float = 0.3

    def check(self, source: str = "cache-run") -> None:
        if not self.models:
            raise SpecError(source, "--catalogue", "has no models")
        if not self.cells or any(not devs for _, devs in self.cells):
            raise SpecError(source, "topology", "needs at least one edge, each with a device in its cell "
                            f"{got([e for e, d in self.cells if not d])}")
        for name, value, lo, hi in (("--zipf", self.zipf, 0.0, 10.0), ("--mobility", self.mobility, 0.0, 1.0),
                                    ("cell_skew", self.cell_skew, 0.0, 1.0)):
            if not lo <= value <= hi:
                raise SpecError(source, name, f"must be in {lo:g}..{hi:g} {got(value)}")
        if self.requests < 1:
            raise SpecError(source, "--requests", f"must be >= 1 {got(self.requests)}")
        if self.rate_per_s <= 0:
            raise SpecError(source, "--rate", f"must be > 0 {got(self.rate_per_s)}")


@dataclass(frozen=True)
class Request:
    index: int
    t_s: float  # arrival time since the start
    device: str
    edge: str  # the edge of the device's cell at that moment
    model: str
    handover: bool  # the device moved to another cell after this request


def popularity(spec: WorkloadSpec) -> dict[str, np.ndarray]:
    """Per edge, each model's request probability (indexed like ``spec.models``)."""
    return _popularity(spec, np.random.default_rng(spec.seed))


def _popularity(spec: WorkloadSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(spec.models)
    weights = np.arange(1, n + 1, dtype=np.float64) ** -spec.zipf
    ranking = rng.permutation(n)  # ranking[k] = model at rank k
    out = {}
    for edge, _ in spec.cells:
        order = ranking.copy()
        k = int(round(spec.cell_skew * n))
        if k > 1:
            pos = rng.choice(n, size=k, replace=False)
            order[pos] = order[rng.permutation(pos)]
        p = np.empty(n)
        p[order] = weights
        out[edge] = p / p.sum()
    return out


def generate(spec: WorkloadSpec) -> list[Request]:
    """The request sequence of ``spec`` (deterministic)."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    pop = _popularity(spec, rng)
    cdf = {e: np.cumsum(p) for e, p in pop.items()}
    edges = [e for e, _ in spec.cells]
    devices = [(d, e) for e, devs in spec.cells for d in devs]
    where = {d: e for d, e in devices}
    n = spec.requests
    gaps = rng.exponential(1.0 / spec.rate_per_s, size=n)
    times = np.cumsum(gaps) - gaps[0]
    who = rng.integers(len(devices), size=n)
    pick = rng.random(n)
    move = rng.random(n) < spec.mobility
    dest = rng.integers(max(len(edges) - 1, 1), size=n)
    out = []
    for i in range(n):
        dev = devices[int(who[i])][0]
        edge = where[dev]
        m = min(int(np.searchsorted(cdf[edge], pick[i], side="right")), len(spec.models) - 1)
        moved = bool(move[i]) and len(edges) > 1
        if moved:
            others = [e for e in edges if e != edge]
            where[dev] = others[int(dest[i]) % len(others)]
        out.append(Request(i, float(times[i]), dev, edge, spec.models[m], moved))
    return out


def digest(requests: list[Request]) -> str:
    """SHA-256 of the request sequence (device, edge, model, handover per request): two runs that print
    the same digest served the same requests, whatever their mode."""
    h = hashlib.sha256()
    for r in requests:
        h.update(f"{r.device}\t{r.edge}\t{r.model}\t{int(r.handover)}\n".encode())
    return h.hexdigest()


def save(path: str | Path, spec: WorkloadSpec, requests: list[Request]) -> Path:
    """Record a workload (spec and requests) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "spec": asdict(spec),
            "requests": {"t_s": [r.t_s for r in requests], "device": [r.device for r in requests],
                         "edge": [r.edge for r in requests], "model": [r.model for r in requests],
                         "handover": [r.handover for r in requests]}}
    write_atomic(path, json.dumps(data))
    return path


def load(path: str | Path) -> tuple[WorkloadSpec, list[Request]]:
    """A recorded workload back (SpecError if the file is not one)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(path, "file", f"not a readable workload record ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise SpecError(path, "format", f"must be {FORMAT} {got(found)}")
    s = data["spec"]
    spec = WorkloadSpec(models=tuple(s["models"]), cells=tuple((e, tuple(d)) for e, d in s["cells"]),
                        zipf=s["zipf"], requests=s["requests"], mobility=s["mobility"], seed=s["seed"],
                        rate_per_s=s["rate_per_s"], cell_skew=s["cell_skew"])
    r = data["requests"]
    cols = zip(r["t_s"], r["device"], r["edge"], r["model"], r["handover"], strict=True)
    reqs = [Request(i, float(t), d, e, m, bool(h)) for i, (t, d, e, m, h) in enumerate(cols)]
    return spec, reqs
