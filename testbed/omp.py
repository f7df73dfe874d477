"""Thread policy of processes that compute: how many intra-op threads, and how idle OpenMP threads wait.

libgomp (torch's intra-op threads, and llama.cpp's) reads its wait policy once, when it is loaded, so the
choice is made by ``import testbed`` (this package's ``__init__``, :func:`apply`), before torch loads,
and passed on to child compute processes through their environment (:func:`process_env`).  The thread
count can change later (``torch.set_num_threads``); ``testbed.model.shard.set_threads`` applies the plan.

A plan (:func:`plan_threads`) comes from the cores a process really has:

- its CPU limit: the affinity mask, the cgroup CPU quota of its own cgroup (v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``, v2 ``cpu.max``, ancestors included) and a limit its launcher passes (the host's);
- the processes it shares the machine with: the run's own compute processes (``sharers``) and the others
  busy on the machine (runnable tasks in ``/proc/stat``, sampled briefly, minus those of this process and
  its descendants, which a launcher counts among its sharers).

Busy processes decide how its threads wait, not how many it has.  A spinning thread holds its core
while the thread it waits for shares the other core with a busy process and is parked by the scheduler:
int4 decode, a few hundred parallel ops per token, fell to 0.8x fp32 with one busy process on 2 cores.
Threads that sleep while they wait are woken ahead of a busy loop (the scheduler favours tasks that
slept), so a passive process keeps the speed of its threads beside others (``bench/omp_contention.py``:
2 passive threads beat 1 thread there, and the old 2 spinning threads).  Waiting:

- ``spin`` (``GOMP_SPINCOUNT=10000``, idle threads spin briefly, then sleep): a process that computes alone
  with two or more threads on a machine where nothing else is busy.  Every op on two threads then starts
  without waking a sleeping thread: a quantized decode step runs 1.6-1.9x faster (``bench/omp_wait.py``).
- ``passive`` (``OMP_WAIT_POLICY=PASSIVE``, idle threads sleep at once): processes of a run that compute
  at the same time (spinning threads take the cores from the thread doing work: two decoding processes on
  2 cores, 3-6x less throughput), a process beside other busy processes, and a process with one thread
  (it has no other thread to wait for).

``TESTBED_OMP=passive|spin`` picks the wait for all; ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` and
``OMP_NUM_THREADS`` set by the user win over the plan.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

ENV_VAR = "TESTBED_OMP"
THREADS_VAR = "TESTBED_THREADS"  # set by process_env: the launcher's plan for a child
POLICIES: dict[str, dict[str, str]] = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin": {"GOMP_SPINCOUNT": "10000"},
}
# where TESTBED_OMP is unset: shard nodes share the cores with each other; a process on its own ("local":
# a command, the one-process reference, a benchmark) follows its plan
DEFAULTS = {"local": "plan", "node": "passive"}
_USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_THREAD_KEYS = (THREADS_VAR, "OMP_NUM_THREADS")
SAMPLES, SAMPLE_S = 6, 0.01  # the busy-process sample: ~50 ms at start-up


@dataclass(frozen=True)
class ThreadPlan:
    """How many intra-op threads one compute process gets, how its idle threads wait, and why."""

    threads: int
    wait: str  # a key of POLICIES
    why: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# -- what a process has ---------------------------------------------------------------------------
def machine_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def quota_v1(folder: Path) -> float | None:
    """Cores a cgroup v1 ``cpu`` folder allows (``cfs_quota_us / cfs_period_us``); None: no quota."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_v2(folder: Path) -> float | None:
    """Cores a cgroup v2 folder allows (``cpu.max``: ``QUOTA PERIOD`` or ``max PERIOD``); None: no quota."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _cgroup_folders(proc: Path) -> list[tuple[Path, Path, bool]]:
    """(mount point, the process's cgroup folder, v2?) for the cgroup hierarchies that hold a CPU quota."""
    try:
        groups = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        root, point, v2 = fields[3], Path(fields[4]), tail[0] == "cgroup2"
        if not v2 and "cpu" not in tail[2].split(","):
            continue
        for g in groups:
            hier, _, rest = g.partition(":")
            controllers, _, path = rest.partition(":")
            if (hier == "0" and controllers == "") != v2 or (not v2 and "cpu" not in controllers.split(",")):
                continue
            if root != "/" and path.startswith(root):  # the mount shows only part of the hierarchy
                path = path[len(root):]
            found.append((point, point / path.lstrip("/"), v2))
    return found


def cgroup_cpu_limit(proc: Path = Path("/proc/self")) -> float | None:
    """Cores the cgroup of process ``proc`` may use: the smallest quota of its cgroup and the cgroups
    above it, on cgroup v1 or v2; None where nothing limits it."""
    limits = []
    for point, folder, v2 in _cgroup_folders(proc):
        f = folder
        while True:
            q = quota_v2(f) if v2 else quota_v1(f)
            if q is not None:
                limits.append(q)
            if f == point or point not in f.parents:
                break
            f = f.parent
    return min(limits) if limits else None


def _procs_running() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 0


def _family() -> list[int]:
    """This process and its descendants (a launcher's node programs among them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _own_running(pids: list[int] | None = None) -> int:
    """Runnable threads of the processes ``pids`` (default: this one, the reading thread among them)."""
    n = 0
    for pid in pids or [os.getpid()]:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                # the state is the field after the command's closing parenthesis
                n += (task / "stat").read_text().rpartition(")")[2].split()[0] == "R"
            except (OSError, IndexError):
                continue
    return max(n, 1)


def busy_others(samples: int = SAMPLES, interval_s: float = SAMPLE_S) -> float:
    """Mean number of runnable tasks on the machine that are neither this process's nor its descendants',
    over a brief sample."""
    family = _family()  # a launcher's own node programs count among its sharers, not as others
    got = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        got.append(max(0, _procs_running() - _own_running(family)))
    return sum(got) / len(got)


# -- the plan ------------------------------------------------------------------------------------
def plan_threads(
    cpu_limit: float | None, sharers: int = 1, *, others: float | None = None, cores: int | None = None,
    own_quota: bool = True,
) -> ThreadPlan:
    """The thread plan of one compute process.

    ``cpu_limit``: the cores its host may use (a cgroup quota in cores; None: unlimited).
    ``sharers``: compute processes of the run, this one included, that compute at the same time.
    ``others``: tasks busy on the machine besides this one (None: sampled now, where it decides the
    wait; this process's descendants are not counted).  ``cores``: cores it may run on (None: this
    process's affinity).  ``own_quota``: also apply this process's own cgroup quota (a child inherits it
    where it is started from here).
    Threads = the cores divided among the sharers, within the limits, at least 1; only a process that
    computes alone, with nothing else busy, on two or more threads spins.
    """
    cores = machine_cores() if cores is None else cores
    sharers = max(1, sharers)
    why = [f"{cores} core{'s' * (cores != 1)}"]
    avail = float(cores)
    quota = cgroup_cpu_limit() if own_quota else None
    for name, lim in (("cgroup quota", quota), ("host limit", cpu_limit)):
        if lim is not None:
            why.append(f"{name} {lim:g}")
            avail = min(avail, lim)
    threads = max(1, int(min(avail, cores / sharers)))
    if others is None and threads > 1 and sharers == 1:  # only a process that may spin needs the sample
        others = busy_others()
    busy = 0 if others is None else int(others + 0.5)  # runnable half the time: it takes a core
    if others is not None:
        why.append(f"{others:.1f} busy other{'s' * (busy != 1)}")
    if sharers > 1:
        why.append(f"{sharers} sharers")
    if threads == 1:
        wait, because = "passive", "one thread waits for no other"
    elif sharers > 1:
        wait, because = "passive", "processes of the run compute at once"
    elif busy:
        wait, because = "passive", "other processes compute beside it"
    else:
        wait, because = "spin", "alone on free cores"
    why.append(f"-> {threads} thread{'s' * (threads != 1)}, {wait}: {because}")
    return ThreadPlan(threads=threads, wait=wait, why=", ".join(why[:-1]) + " " + why[-1])


def _env_threads(env: Mapping[str, str]) -> tuple[int, str] | None:
    """Threads fixed in ``env`` (a launcher's TESTBED_THREADS, else the user's OMP_NUM_THREADS)."""
    for key in _THREAD_KEYS:
        try:
            n = int(env.get(key, "").split(",")[0])
        except ValueError:
            continue
        if n >= 1:
            return n, key
    return None


# -- this process -------------------------------------------------------------------------------------
_PLAN: ThreadPlan | None = None
_APPLIED: str | None = None
_ADDED: dict[str, str] = {}


def own_plan() -> ThreadPlan:
    """This process's plan (made once): threads and wait from its environment where a launcher or the
    user fixed them, else from :func:`plan_threads` for a process that computes alone."""
    global _PLAN
    if _PLAN is None:
        env = {k: v for k, v in os.environ.items() if not (k in _ADDED and _ADDED[k] == v)}
        fixed = _env_threads(env)
        chosen = env.get(ENV_VAR, "")
        user = [f"{k}={env[k]}" for k in _USER_KEYS if k in env]
        if fixed and (chosen or user):  # a launcher (process_env) or the user chose both: no sample
            passive = env.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
            wait = chosen if chosen in POLICIES else "passive" if passive else "spin"
            _PLAN = ThreadPlan(fixed[0], wait, f"{fixed[1]}={fixed[0]}, {ENV_VAR}={chosen or ','.join(user)}")
        else:
            plan = plan_threads(None, 1)
            threads, why = (fixed[0], f"{fixed[1]}={fixed[0]}") if fixed else (plan.threads, plan.why)
            wait = chosen if chosen in POLICIES else plan.wait
            if chosen in POLICIES:
                why += f"; wait {chosen} set by {ENV_VAR}"
            elif user:
                why += f"; wait set by {','.join(user)}"
            _PLAN = ThreadPlan(threads, wait, why)
    return _PLAN


def policy_name(env: Mapping[str, str] | None = None, role: str = "local") -> str:
    """The policy ``env`` asks for: ``TESTBED_OMP``, else the default for ``role`` (local: this process's
    plan; node: passive)."""
    env = os.environ if env is None else env
    name = env.get(ENV_VAR, "") or DEFAULTS[role]
    if name == "plan":
        name = own_plan().wait
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


def apply() -> str:
    """Set this process's libgomp variables for its plan; returns what is in effect.  Too late (and
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
    """The wait policy this process runs with (as :func:`apply` found it)."""
    return apply()


def summary(threads_in_use: int | None = None) -> dict:
    """Which plan ran, for a command's JSON: threads, wait and why (and who changed the threads)."""
    plan = own_plan()
    out = {"threads": plan.threads, "wait": in_effect(), "why": plan.why}
    if threads_in_use is not None and threads_in_use != plan.threads:
        out.update(threads=threads_in_use, why=f"{plan.why}; {threads_in_use} threads set by the caller")
    return out


# -- child processes -----------------------------------------------------------------------------------
def process_env(base: Mapping[str, str], plan: ThreadPlan) -> dict[str, str]:
    """``base`` for a child compute process that follows ``plan``.  ``TESTBED_OMP``, ``OMP_WAIT_POLICY``
    / ``GOMP_SPINCOUNT`` and ``OMP_NUM_THREADS`` set by the user win."""
    out = {k: v for k, v in base.items() if not (k in _ADDED and _ADDED[k] == v)}
    user = base.get(ENV_VAR, "")
    out[ENV_VAR] = user if user in POLICIES else plan.wait
    out.update(omp_env(out, "node"))
    fixed = _env_threads({"OMP_NUM_THREADS": out.get("OMP_NUM_THREADS", "")})
    n = str(fixed[0] if fixed else plan.threads)
    out.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=out.get("MKL_NUM_THREADS", n), TESTBED_THREADS=n)
    return out
