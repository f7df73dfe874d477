"""How idle OpenMP threads wait in processes that run shards; chosen before torch loads.

libgomp (torch's intra-op threads, and llama.cpp's) reads its environment once, when it is loaded, so
the choice is made by ``import testbed`` (this package's ``__init__``) and passed on to node processes
through their environment.  ``TESTBED_OMP=passive|spin`` picks it for all; unset, a process that computes
alone (a command, the one-process reference, a benchmark) spins and shard nodes are passive:

- ``passive`` (nodes): ``OMP_WAIT_POLICY=PASSIVE``, idle threads sleep at once.  Several shard processes
  share the cores of one machine; when two of them compute at once, spinning threads take the cores from
  the thread doing work (two decoding processes on 2 cores: 3-6x less throughput spinning,
  ``bench/omp_wait.py``).
- ``spin`` (one process): ``GOMP_SPINCOUNT=10000``, idle threads spin briefly, then sleep.  Every op
  that runs on two threads then starts without waking a sleeping thread: a quantized decode step (a
  hundred-odd such ops) runs 1.6-1.9x faster where one process computes at a time (one process, or a
  chain of shards serving one session), at the cost above where processes compute concurrently.

``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set by the user win over both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

ENV_VAR = "TESTBED_OMP"
POLICIES: dict[str, dict[str, str]] = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin": {"GOMP_SPINCOUNT": "10000"},
}
# where TESTBED_OMP is unset: the process itself (a command, the one-process reference, a benchmark)
# computes alone; shard nodes share the cores with each other
DEFAULTS = {"local": "spin", "node": "passive"}
_USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def policy_name(env: Mapping[str, str] | None = None, role: str = "local") -> str:
    """The policy ``env`` asks for: ``TESTBED_OMP``, else the default for ``role`` (local or node)."""
    env = os.environ if env is None else env
    name = env.get(ENV_VAR, "") or DEFAULTS[role]
    if name not in POLICIES:
        raise ValueError(f"{ENV_VAR}={name!r}: choose one of {', '.join(POLICIES)}")
    return name


def omp_env(env: Mapping[str, str] | None = None, role: str = "local") -> dict[str, str]:
    """libgomp's variables for ``env``'s policy (none where the user set libgomp's own)."""
    env = os.environ if env is None else env
    name = policy_name(env, role)
    return {} if any(k in env for k in _USER_KEYS) else dict(POLICIES[name])


def describe(env: Mapping[str, str] | None = None, role: str = "local") -> str:
    """What a process with ``env`` runs with, for reports: the policy's name, or the user's variables."""
    env = os.environ if env is None else env
    name = policy_name(env, role)
    user = [f"{k}={env[k]}" for k in _USER_KEYS if k in env and POLICIES[name].get(k) != env[k]]
    return ",".join(user) if user else name


_APPLIED: str | None = None
_ADDED: dict[str, str] = {}


def apply() -> str:
    """Set this process's libgomp variables for its policy; returns what is in effect.  Too late (and
    said so) once torch is loaded."""
    global _APPLIED
    if _APPLIED is None:
        if "torch" in sys.modules:
            _APPLIED = "unset (torch was loaded first)"
        else:
            _ADDED.update(omp_env())
            os.environ.update(_ADDED)
            _APPLIED = describe()
    return _APPLIED


def in_effect() -> str:
    """The policy this process runs with (as :func:`apply` found it)."""
    return apply()


def node_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a shard node process: this process's own policy variables replaced by the nodes'."""
    out = {k: v for k, v in env.items() if not (k in _ADDED and _ADDED[k] == v)}
    name = policy_name(out, "node")
    out.update(omp_env(out, "node"))
    out[ENV_VAR] = name
    return out


@dataclass(frozen=True)
class ThreadPlan:
    """How many intra-op threads one compute process gets, and how its idle threads wait."""

    threads: int
    wait: str  # a key of POLICIES


def machine_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def plan_threads(cpu_limit: float | None, sharers: int = 1) -> ThreadPlan:
    """The thread plan of one compute process.

    ``cpu_limit``: the cores its host may use (a cgroup quota in cores; None: unlimited).
    ``sharers``: compute processes, this one included, that run at the same time on this machine.
    A process never gets more threads than its share of the cores, so threads of processes that
    compute at once do not queue behind each other; only a process that computes alone spins.
    """
    cores = machine_cores()
    avail = cores if cpu_limit is None else min(float(cores), cpu_limit)
    threads = max(1, int(avail // max(1, sharers)))
    return ThreadPlan(threads=threads, wait="spin" if sharers <= 1 else "passive")


def process_env(base: Mapping[str, str], plan: ThreadPlan) -> dict[str, str]:
    """``base`` for a child compute process that follows ``plan`` (``TESTBED_OMP`` set by the user wins)."""
    out = {k: v for k, v in base.items() if not (k in _ADDED and _ADDED[k] == v)}
    user = base.get(ENV_VAR, "")
    out[ENV_VAR] = user if user in POLICIES else plan.wait
    out.update(omp_env(out, "node"))
    n = str(plan.threads)
    out.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TESTBED_THREADS=n)
    return out
