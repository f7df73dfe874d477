"""Placement and eviction policies: one small interface, the same objects in emulated and replay mode.

A policy is told about each request (``request(edge, model) -> Plan``) and answers what the edge must do:
which units to evict, which to deliver before serving, which of those to keep.  A proactive policy also
hands out re-placements (``placement() -> {edge: Plan}``) every ``window`` requests, which the caller
applies in the background (prefetch).  The caller (the replay engine, or an edge node) does the moving; the
policy keeps the bookkeeping, so both modes make the same decisions for the same requests.

Policies work on *units*: maximal groups of blocks that belong to exactly the same set of models (the
fp32 base's layers shared by every fp32 variant, one adapter's tensors, ...).  Blocks of a unit are always
cached and evicted together by every policy here, so deciding per unit is deciding per block, and it keeps
1,000-model instances fast.  ``Units.blocks(u)`` expands a unit back to block hashes.

Policies (``testbed.spec.options.CACHE_POLICIES``):

* ``lru``, ``lfu``, ``random``: whole-model caches, the baseline most caches use.  They do not know about
  blocks: a miss transfers the model's full bytes and a cached model's full bytes count against the
  capacity (two cached variants of one base count the base twice).  They evict the least recently used,
  least frequently used (ties: least recent) or a random cached model.
* ``block-lru``: block-aware LRU.  A request is a hit when all its blocks are present; a miss moves only
  the missing units; a shared unit is counted once and removed only when no cached model needs it.
* ``trimcaching``: TrimCaching-style proactive placement (parameter-sharing model placement, ICDCS 2024):
  every ``window`` requests, per edge (= per cell), from that cell's request counts so far, a greedy picks
  models by popularity per *marginal* byte (shared units already chosen cost nothing; see
  ``greedy_placement``).  The edge prefetches what the placement adds and evicts only as much of what it
  drops as the additions need (least requested first).  Between placements a miss is served by fetching
  the missing units, kept only where they fit in free space.  Before the first placement it behaves like
  that too.
* ``optimal``: the same proactive scheme with the exact placement: a MILP per edge
  (``scipy.optimize.milp``): maximise covered popularity, ``x_m <= y_u`` for each unit ``u`` of model
  ``m``, ``sum s_u y_u <= C``.  For small instances (at most ``OPTIMAL_MAX_MODELS`` models).

Public API: ``Units``/``units_of``, ``Plan``, ``Policy`` (``request``, ``placement``, ``present``,
``used_bytes``, ``hit``), ``make_policy``, ``greedy_placement``, ``milp_placement``,
``placement_value``, ``check_capacity``, ``POLICIES``.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from testbed.spec.errors import SpecError, got
from testbed.spec.options import CACHE_POLICIES as POLICIES

OPTIMAL_MAX_MODELS = 100  # the exact placement is for small instances
DEFAULT_WINDOW = 200  # requests between two proactive placements


# -- units -------------------------------------------------------------------------------------------------

@dataclass
class Units:
    """Blocks grouped by the set of models that contain them."""

    models: list[str]
    index: dict[str, int]
    size: np.ndarray  # bytes per unit
    unit_blocks: list[list[str]]
    model_units: list[np.ndarray]  # unit ids of each model
    unit_models: list[np.ndarray]  # model ids of each unit
    model_bytes: np.ndarray  # each model's bytes (its units' sizes)
    # the same as plain Python ints: the per-request paths avoid numpy scalars (10x slower to handle)
    mu: list[list[int]] = field(default_factory=list)  # model -> unit ids
    us: list[int] = field(default_factory=list)  # unit -> bytes
    mb: list[int] = field(default_factory=list)  # model -> bytes

    def __post_init__(self) -> None:
        self.mu = [[int(u) for u in us] for us in self.model_units]
        self.us = [int(x) for x in self.size]
        self.mb = [int(x) for x in self.model_bytes]

    @functools.cached_property
    def incidence(self):
        """Sparse models x units matrix, 1 where a model holds a unit."""
        from scipy.sparse import csr_matrix

        rows = np.repeat(np.arange(len(self.model_units)), [len(us) for us in self.model_units])
        cols = np.concatenate(self.model_units) if self.model_units else np.zeros(0, dtype=np.int64)
        return csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(self.model_units), len(self.size)))

    def blocks(self, units: Sequence[int]) -> list[str]:
        return [h for u in units for h in self.unit_blocks[u]]

    def bytes_of(self, units) -> int:
        us = self.us
        return sum(us[u] for u in units)

    def units(self, model: str) -> np.ndarray:
        return self.model_units[self.index[model]]


def units_of(catalogue) -> Units:
    """Group a catalogue's blocks into units (see the module's docstring)."""
    models = list(catalogue.models)
    member: dict[str, list[int]] = {}
    for i, name in enumerate(models):
        for h in catalogue.models[name].hashes():
            member.setdefault(h, []).append(i)
    groups: dict[tuple[int, ...], list[str]] = {}
    for h, ms in member.items():
        groups.setdefault(tuple(ms), []).append(h)
    keys = list(groups)
    size = np.array([sum(catalogue.block_sizes[h] for h in groups[k]) for k in keys], dtype=np.int64)
    m_units: list[list[int]] = [[] for _ in models]
    for u, k in enumerate(keys):
        for m in k:
            m_units[m].append(u)
    model_units = [np.array(us, dtype=np.int64) for us in m_units]
    return Units(models=models, index={n: i for i, n in enumerate(models)}, size=size,
                 unit_blocks=[groups[k] for k in keys], model_units=model_units,
                 unit_models=[np.array(k, dtype=np.int64) for k in keys],
                 model_bytes=np.array([int(size[us].sum()) for us in model_units], dtype=np.int64))


def check_capacity(units: Units, capacity_bytes: int, source: str = "cache-run",
                   field_name: str = "--capacity-mb") -> None:
    """SpecError when the capacity cannot hold the largest model (no policy could serve it from cache)."""
    i = int(np.argmax(units.model_bytes))
    need = int(units.model_bytes[i])
    if capacity_bytes < need:
        raise SpecError(source, field_name, f"smaller than the largest model, {units.models[i]} "
                        f"({need / 1e6:.2f} MB) {got(round(capacity_bytes / 1e6, 3))}")


# -- plans and the interface -------------------------------------------------------------------------------

@dataclass
class Plan:
    """What an edge does for one request (or one re-placement): ``evict`` first, then deliver ``fetch``
    (in this order), of which ``store`` is written to the store; the rest is used for serving and
    dropped.  ``hit``: the model was served from the store alone.  ``present_bytes``: bytes of the model
    that were already present (the byte hit)."""

    hit: bool
    fetch: list[int] = field(default_factory=list)
    store: list[int] = field(default_factory=list)
    evict: list[int] = field(default_factory=list)
    present_bytes: int = 0


class Policy(ABC):
    """The interface every policy implements (subclasses define ``_serve``; proactive ones ``_place``)."""

    name = ""
    proactive = False

    def __init__(self, units: Units, edges: Sequence[str], capacity_bytes: int, seed: int = 0,
                 window: int = DEFAULT_WINDOW) -> None:
        self.u = units
        self.edges = list(edges)
        self.capacity = int(capacity_bytes)
        self.window = int(window)
        self.rng = np.random.default_rng(seed)
        self.requests = 0
        self.counts = {e: np.zeros(len(units.models), dtype=np.float64) for e in self.edges}
        self._present: dict[str, set[int]] = {e: set() for e in self.edges}
        self._used = {e: 0 for e in self.edges}  # physical bytes (each unit once)

    # the interface ------------------------------------------------------------------------------------
    def request(self, edge: str, model: str) -> Plan:
        """Record a request for ``model`` at ``edge`` and return what the edge must do to serve it."""
        self.requests += 1
        m = self.u.index[model]
        self.counts[edge][m] += 1
        plan = self._serve(edge, m)
        self._apply(edge, plan)
        return plan

    def placement(self) -> dict[str, Plan]:
        """Proactive re-placements due now (after every ``window``-th request); {} for reactive policies."""
        if not self.proactive or self.requests == 0 or self.requests % self.window:
            return {}
        plans = {}
        us = self.u.us
        for e in self.edges:
            target = self._place(e)
            present = self._present[e]
            fetch = sorted(target - present)
            # lazy eviction: units outside the new placement stay while there is room (a model at the
            # margin that drops out and comes back is not moved twice); the least requested go first
            free = self.capacity - self._used[e] - self.u.bytes_of(fetch)
            evict = []
            if free < 0:
                asked = self.u.incidence.T @ self.counts[e]  # requests per unit at this edge
                for u in sorted(present - target, key=lambda u: (asked[u], u)):
                    if free >= 0:
                        break
                    evict.append(u)
                    free += us[u]
            plan = Plan(hit=False, evict=evict, fetch=fetch, store=list(fetch))
            if plan.evict or plan.fetch:
                self._apply(e, plan)
                plans[e] = plan
        return plans

    def present(self, edge: str) -> set[int]:
        """Units stored at ``edge`` now."""
        return self._present[edge]

    def used_bytes(self, edge: str) -> int:
        """Bytes stored at ``edge`` (each unit once)."""
        return self._used[edge]

    def hit(self, edge: str, model: str) -> bool:
        """Would a request for ``model`` at ``edge`` be served from the store alone, now?"""
        return self._is_hit(edge, self.u.index[model])

    # helpers -------------------------------------------------------------------------------------------
    def _is_hit(self, edge: str, m: int) -> bool:
        present = self._present[edge]
        return all(u in present for u in self.u.mu[m])

    def _present_bytes(self, edge: str, m: int) -> int:
        present = self._present[edge]
        us = self.u.us
        return sum(us[u] for u in self.u.mu[m] if u in present)

    def _apply(self, edge: str, plan: Plan) -> None:
        present = self._present[edge]
        for u in plan.evict:
            if u in present:
                present.remove(u)
                self._used[edge] -= self.u.us[u]
        for u in plan.store:
            if u not in present:
                present.add(u)
                self._used[edge] += self.u.us[u]
        assert self._used[edge] <= self.capacity, (self.name, edge, self._used[edge], self.capacity)

    @abstractmethod
    def _serve(self, edge: str, m: int) -> Plan: ...

    def _place(self, edge: str) -> set[int]:
        raise NotImplementedError


# -- whole-model caches ------------------------------------------------------------------------------------

class _WholeModel(Policy):
    """Cached models' full bytes count against the capacity; a miss moves the model's full bytes."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.cached: dict[str, OrderedDict[int, None]] = {e: OrderedDict() for e in self.edges}
        self.charged = {e: 0 for e in self.edges}
        self.refs = {e: {} for e in self.edges}  # unit -> number of cached models holding it
        self.last = {e: {} for e in self.edges}  # model -> request number of its last use

    def _victim(self, edge: str) -> int:
        return next(iter(self.cached[edge]))  # least recently used

    def _is_hit(self, edge: str, m: int) -> bool:
        return m in self.cached[edge]  # block-unaware: a model is cached as a whole or not at all

    def _serve(self, edge: str, m: int) -> Plan:
        cached, refs = self.cached[edge], self.refs[edge]
        self.last[edge][m] = self.requests
        if m in cached:
            cached.move_to_end(m)
            return Plan(hit=True, present_bytes=self.u.mb[m])
        units = list(self.u.mu[m])
        for u in units:  # held first, so that evicting another model never takes a unit this one needs
            refs[u] = refs.get(u, 0) + 1
        evict: list[int] = []
        need = self.u.mb[m]
        while self.charged[edge] + need > self.capacity:
            v = self._victim(edge)
            del cached[v]
            self.charged[edge] -= self.u.mb[v]
            for u in self.u.mu[v]:
                refs[u] -= 1
                if refs[u] == 0:
                    del refs[u]
                    evict.append(u)
        cached[m] = None
        self.charged[edge] += need
        # block-unaware: the whole model travels, even units another cached model already brought
        store = [u for u in units if u not in self._present[edge]]
        return Plan(hit=False, fetch=units, store=store, evict=evict, present_bytes=0)


class LRU(_WholeModel):
    name = "lru"


class LFU(_WholeModel):
    name = "lfu"

    def _victim(self, edge: str) -> int:
        counts, last = self.counts[edge], self.last[edge]
        return min(self.cached[edge], key=lambda v: (counts[v], last.get(v, 0)))


class Random(_WholeModel):
    name = "random"

    def _victim(self, edge: str) -> int:
        cached = list(self.cached[edge])
        return cached[int(self.rng.integers(len(cached)))]


# -- block-aware LRU ----------------------------------------------------------------------------------------

class BlockLRU(Policy):
    name = "block-lru"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.cached: dict[str, OrderedDict[int, None]] = {e: OrderedDict() for e in self.edges}
        self.refs = {e: {} for e in self.edges}

    def _serve(self, edge: str, m: int) -> Plan:
        cached, refs, present = self.cached[edge], self.refs[edge], self._present[edge]
        units = list(self.u.mu[m])
        present_bytes = self._present_bytes(edge, m)
        hit = all(u in present for u in units)
        if m in cached:
            cached.move_to_end(m)
        else:  # held from now on, so that the evictions below never take its own units
            cached[m] = None
            for u in units:
                refs[u] = refs.get(u, 0) + 1
        if hit:
            return Plan(hit=True, present_bytes=present_bytes)
        missing = [u for u in units if u not in present]
        need = self.u.bytes_of(missing)
        evict: list[int] = []
        used = self._used[edge]
        while used + need > self.capacity:
            v = next(iter(cached))
            if v == m:  # only the requested model left: cannot happen when capacity >= its bytes
                break
            del cached[v]
            for u in self.u.mu[v]:
                refs[u] -= 1
                if refs[u] == 0:
                    del refs[u]
                    if u in present:
                        evict.append(u)
                        used -= self.u.us[u]
        return Plan(hit=False, fetch=missing, store=missing, evict=evict, present_bytes=present_bytes)


# -- proactive placement -----------------------------------------------------------------------------------

class _Proactive(Policy):
    proactive = True

    def _serve(self, edge: str, m: int) -> Plan:
        present = self._present[edge]
        units = list(self.u.mu[m])
        missing = [u for u in units if u not in present]
        present_bytes = self._present_bytes(edge, m)
        if not missing:
            return Plan(hit=True, present_bytes=present_bytes)
        # served from the delivered units; kept where they fit without evicting the placement
        free = self.capacity - self._used[edge]
        store = []
        for u in missing:
            if self.u.us[u] <= free:
                store.append(u)
                free -= self.u.us[u]
        return Plan(hit=False, fetch=missing, store=store, present_bytes=present_bytes)

    def _place(self, edge: str) -> set[int]:
        chosen = self._solve(self.counts[edge])
        return {u for m in chosen for u in self.u.mu[m]}

    @abstractmethod
    def _solve(self, popularity: np.ndarray) -> list[int]: ...


class TrimCaching(_Proactive):
    name = "trimcaching"

    def _solve(self, popularity: np.ndarray) -> list[int]:
        return greedy_placement(self.u, popularity, self.capacity)


class Optimal(_Proactive):
    name = "optimal"

    def __init__(self, units: Units, *a, **kw) -> None:
        if len(units.models) > OPTIMAL_MAX_MODELS:
            raise SpecError("cache-run", "--policy", f"optimal solves a MILP and is for at most "
                            f"{OPTIMAL_MAX_MODELS} models; this catalogue has {len(units.models)} "
                            f"{got('optimal')}")
        super().__init__(units, *a, **kw)

    def _solve(self, popularity: np.ndarray) -> list[int]:
        return milp_placement(self.u, popularity, self.capacity)


# -- placement solvers -------------------------------------------------------------------------------------

def placement_value(units: Units, popularity: np.ndarray, models: Sequence[int]) -> float:
    """Share of the popularity mass that ``models`` cover (the expected hit ratio of a placement)."""
    total = float(popularity.sum())
    return float(sum(popularity[m] for m in models)) / total if total > 0 else 0.0


def _greedy(units: Units, popularity: np.ndarray, capacity: int, by_ratio: bool,
            start: Sequence[int] = (), banned: int | None = None) -> list[int]:
    """One greedy run; ``start``: models placed first (in order), ``banned``: a model never picked."""
    gain = np.asarray(popularity, dtype=np.float64)
    alive = gain > 0
    if banned is not None:
        alive[banned] = False
    chosen = list(start)
    chosen_units = {u for m in chosen for u in units.mu[m]}
    left = float(capacity - units.bytes_of(chosen_units))
    if left < 0:
        return []
    # what each model would still add, given the start (one sparse product instead of a loop)
    missing = units.size.astype(np.float64)
    missing[list(chosen_units)] = 0.0
    marginal = units.incidence @ missing
    alive[chosen] = False
    while True:
        ok = alive & (marginal <= left)
        if not ok.any():
            break
        # most popularity per marginal byte; or most popular first (ties: the smaller marginal)
        score = gain / np.maximum(marginal, 1.0) if by_ratio else gain - marginal * 1e-18
        m = int(np.argmax(np.where(ok, score, -np.inf)))
        chosen.append(m)
        alive[m] = False
        left -= marginal[m]
        for u in units.mu[m]:
            if u not in chosen_units:  # this unit is now free for every model that contains it
                chosen_units.add(u)
                marginal[units.unit_models[u]] -= units.us[u]
    return chosen


GREEDY_TRIES = 6  # first picks tried, and models tried out of the placement (fewer on big instances)
BIG_INSTANCE = 200  # models with requests above which GREEDY_TRIES drops to 2


def greedy_placement(units: Units, popularity: np.ndarray, capacity: int,
                     tries: int | None = None) -> list[int]:
    """TrimCaching-style greedy: add the model with the most popularity per marginal byte (bytes of its
    units not chosen yet) while it fits.  A pure ratio greedy undervalues a family of models (a base and
    its adapters are cheap together, dear one by one) and lets cheap models fill the room a big popular
    one needed, so two cheap corrections follow, each a few more greedy runs:

    * partial enumeration: the greedy also runs from each of the ``tries`` most popular models as a forced
      first pick, and a most-popular-first greedy runs too; the best placement is kept;
    * exchange: each of the ``tries`` chosen models holding the most bytes no other chosen model needs is
      taken out, alone or for one of the ``tries`` most popular models left out, and the rest refilled
      greedily; an improvement is kept and the exchange repeated once.

    Returns model ids."""
    pop = np.asarray(popularity, dtype=np.float64)
    if tries is None:
        tries = GREEDY_TRIES if int((pop > 0).sum()) <= BIG_INSTANCE else 2

    def value(r: list[int]) -> float:
        return placement_value(units, pop, r)

    runs = [_greedy(units, pop, capacity, by_ratio=True), _greedy(units, pop, capacity, by_ratio=False)]
    top_all = [int(m) for m in np.argsort(-pop, kind="stable") if pop[m] > 0]
    top = top_all[:tries]
    runs += [_greedy(units, pop, capacity, by_ratio=True, start=[m]) for m in top]
    best = max(runs, key=value)
    for _ in range(2):
        holders: dict[int, int] = {}
        for m in best:
            for u in units.mu[m]:
                holders[u] = holders.get(u, 0) + 1
        alone = {m: sum(units.us[u] for u in units.mu[m] if holders[u] == 1) for m in best}
        out = sorted(best, key=lambda m: -alone[m])[:tries]
        chosen = set(best)
        into = [None] + [m for m in top_all if m not in chosen][:tries]
        cands = [_greedy(units, pop, capacity, True, banned=x,
                         start=[m for m in best if m != x] + ([] if y is None else [y]))
                 for x in out for y in into]
        better = max(cands, key=value, default=best)
        if value(better) <= value(best):
            break
        best = better
    return best


def milp_placement(units: Units, popularity: np.ndarray, capacity: int,
                   time_limit_s: float = 60.0) -> list[int]:
    """The exact placement for one edge as a MILP (see the module's docstring).  Returns model ids."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    cand = [int(m) for m in np.flatnonzero(popularity > 0)]
    if not cand:
        return []
    ulist = sorted({int(u) for m in cand for u in units.model_units[m]})
    ucol = {u: len(cand) + i for i, u in enumerate(ulist)}
    n = len(cand) + len(ulist)
    rows, cols, vals = [], [], []
    r = 0
    for i, m in enumerate(cand):
        for u in units.model_units[m]:
            rows += [r, r]
            cols += [i, ucol[int(u)]]
            vals += [1.0, -1.0]
            r += 1
    link = coo_matrix((vals, (rows, cols)), shape=(r, n))
    cap_row = np.zeros((1, n))
    scale = float(max(units.size[ulist].max(), 1))
    for u in ulist:
        cap_row[0, ucol[u]] = float(units.size[u]) / scale
    c = np.zeros(n)
    c[: len(cand)] = -popularity[cand].astype(np.float64)
    res = milp(c, constraints=[LinearConstraint(link, -np.inf, 0.0),
                               LinearConstraint(cap_row, -np.inf, capacity / scale)],
               integrality=np.ones(n), bounds=Bounds(0, 1), options={"time_limit": time_limit_s})
    if res.x is None:
        raise RuntimeError(f"MILP placement found no solution: {res.message}")
    chosen = [m for i, m in enumerate(cand) if res.x[i] > 0.5]
    # guard against the solver's tolerance: drop the least popular until the placement really fits
    def size_of(ms: list[int]) -> int:
        return units.bytes_of({int(u) for m in ms for u in units.model_units[m]})
    while chosen and size_of(chosen) > capacity:
        chosen.remove(min(chosen, key=lambda m: popularity[m]))
    return chosen


_CLASSES: dict[str, type[Policy]] = {c.name: c for c in (LRU, LFU, BlockLRU, TrimCaching, Random, Optimal)}
assert tuple(_CLASSES) == POLICIES or set(_CLASSES) == set(POLICIES)


def make_policy(name: str, units: Units, edges: Sequence[str], capacity_bytes: int, seed: int = 0,
                window: int = DEFAULT_WINDOW) -> Policy:
    """The policy called ``name`` (one of ``POLICIES``; SpecError otherwise)."""
    if name not in _CLASSES:
        raise SpecError("cache-run", "--policy", f"must be one of {', '.join(POLICIES)} {got(name)}")
    check_capacity(units, capacity_bytes)
    return _CLASSES[name](units, edges, capacity_bytes, seed=seed, window=window)
