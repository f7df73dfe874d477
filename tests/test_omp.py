"""The thread policy: plans from the cores a process has (affinity, cgroup quota, busy processes), the
OpenMP wait chosen before torch loads, and the environment passed on to node and child processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from testbed import omp
from testbed.apps.launch import program_env

ROOT = Path(__file__).resolve().parents[1]
DROP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "TESTBED_OMP", "TESTBED_THREADS")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


def _child(code: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env or _clean_env(), capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("env", "role", "added", "shown"),
    [
        ({}, "node", {"OMP_WAIT_POLICY": "PASSIVE"}, "passive"),
        ({"TESTBED_OMP": "passive"}, "local", {"OMP_WAIT_POLICY": "PASSIVE"}, "passive"),
        ({"TESTBED_OMP": "spin"}, "node", {"GOMP_SPINCOUNT": "10000"}, "spin"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "node", {}, "OMP_WAIT_POLICY=ACTIVE"),  # the user's own wins
        ({"TESTBED_OMP": "spin", "GOMP_SPINCOUNT": "5"}, "local", {}, "GOMP_SPINCOUNT=5"),
    ],
)
def test_policy_variables(env, role, added, shown) -> None:
    got = omp.omp_env(env, role)
    assert got == added
    assert omp.describe({**env, **got}, role) == shown


def test_a_local_process_without_a_choice_follows_its_plan() -> None:
    plan = omp.own_plan()
    assert plan.wait in omp.POLICIES and plan.threads >= 1 and "->" in plan.why
    assert omp.omp_env({}, "local") == omp.POLICIES[plan.wait]


def test_unknown_policy_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match=r"TESTBED_OMP='busy': choose one of passive, spin"):
        omp.omp_env({"TESTBED_OMP": "busy"})


@pytest.mark.parametrize(
    ("cores", "limit", "others", "sharers", "threads", "wait"),
    [
        (2, None, 0.0, 1, 2, "spin"),  # alone on a quiet machine: all cores, spinning
        (2, None, 1.0, 1, 2, "passive"),  # one busy process: the same threads, sleeping while they wait
        (2, None, 0.4, 1, 2, "spin"),  # a task runnable less than half the time does not count
        (2, None, 0.6, 1, 2, "passive"),
        (2, None, 5.0, 1, 2, "passive"),
        (1, None, 0.0, 1, 1, "passive"),  # one core: one thread, nothing to wait for
        (2, 1.5, 0.0, 1, 1, "passive"),  # a host limit of 1.5 cores holds one thread busy, not two
        (2, 0.5, 0.0, 1, 1, "passive"),  # never fewer than one
        (8, 4.0, 0.0, 1, 4, "spin"),
        (8, None, 0.0, 3, 2, "passive"),  # eight cores among three sharers that compute at once
        (2, None, 0.0, 3, 1, "passive"),
    ],
)
def test_plan_from_cores_limit_and_busy_processes(cores, limit, others, sharers, threads, wait) -> None:
    plan = omp.plan_threads(limit, sharers, others=others, cores=cores, own_quota=False)
    assert (plan.threads, plan.wait) == (threads, wait)
    assert plan.why.startswith(f"{cores} core") and f"-> {threads} thread" in plan.why
    if limit is not None:
        assert f"host limit {limit:g}" in plan.why


def test_cgroup_quota_files(tmp_path) -> None:
    """v1: cfs_quota_us / cfs_period_us (-1: none); v2: cpu.max (``max``: none)."""
    (tmp_path / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert omp.quota_v1(tmp_path) == 1.5
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    assert omp.quota_v1(tmp_path) is None
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert omp.quota_v2(tmp_path) == 0.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert omp.quota_v2(tmp_path) is None
    assert omp.quota_v2(tmp_path / "absent") is None


@pytest.mark.parametrize("v2", [False, True])
def test_cgroup_limit_is_the_smallest_on_the_path_up(tmp_path, v2) -> None:
    """The process's own cgroup, found through its cgroup and mountinfo files, and the cgroups above
    it: the tightest quota on the way to the mount point counts."""
    mount = tmp_path / "fs"
    own = mount / "outer" / "inner"
    own.mkdir(parents=True)
    if v2:
        (mount / "outer" / "cpu.max").write_text("75000 100000\n")
        (own / "cpu.max").write_text("max 100000\n")
        cgroup, line = "0::/outer/inner\n", f"30 23 0:26 / {mount} rw - cgroup2 cgroup2 rw\n"
    else:
        for d, q in ((mount / "outer", "-1"), (own, "300000")):
            (d / "cpu.cfs_quota_us").write_text(q)
            (d / "cpu.cfs_period_us").write_text("100000")
        cgroup = "4:memory:/elsewhere\n3:cpu,cpuacct:/outer/inner\n"
        line = (f"32 31 0:29 / {mount} rw - cgroup cgroup rw,cpu,cpuacct\n"
                f"35 31 0:32 / {tmp_path / 'mem'} rw - cgroup cgroup rw,memory\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + line)
    assert omp.cgroup_cpu_limit(proc) == (0.75 if v2 else 3.0)
    assert omp.cgroup_cpu_limit(tmp_path / "no-such-proc") is None


PLAN = """
import json, os, sys
{before}
import testbed, torch
from testbed import omp
from testbed.model.shard import set_threads
print(json.dumps({{"plan": omp.own_plan().as_dict(), "omp": omp.in_effect(), "torch": set_threads(None),
                  "limit": omp.cgroup_cpu_limit()}}))
"""


CGROUP_V1 = Path("/sys/fs/cgroup/cpu")


@pytest.mark.root
@pytest.mark.skipif(not os.access(CGROUP_V1 / "cpu.cfs_quota_us", os.W_OK), reason="needs cgroup v1, root")
def test_a_process_in_a_cgroup_with_a_quota_plans_one_thread() -> None:
    """A real cgroup with a quota of half a core: the process in it plans one thread, waiting passively."""
    group = CGROUP_V1 / f"testbed-omp-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("50000")
        (group / "cpu.cfs_period_us").write_text("100000")
        before = f"open({str(group / 'tasks')!r}, 'w').write(str(os.getpid()))"
        got = _child(PLAN.format(before=before))
    finally:
        group.rmdir()  # empty again: the child has exited
    assert got["limit"] == 0.5
    assert got["plan"]["threads"] == 1 and got["torch"] == 1
    assert got["plan"]["wait"] == "passive" and got["omp"] == "passive"
    assert "cgroup quota 0.5" in got["plan"]["why"]


def test_a_process_on_one_core_plans_one_thread() -> None:
    """Affinity: a process allowed one core (of any number) plans one thread."""
    got = _child(PLAN.format(before="os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})"))
    assert got["plan"]["threads"] == 1 and got["torch"] == 1
    assert got["plan"]["why"].startswith("1 core ")
    assert got["omp"] == "passive"


def _detached_busy_loop() -> int:
    """A busy loop that is not this process's descendant (its shell exits at once), like another
    user's job: descendants count as the caller's own sharers, not as others."""
    cmd = f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"
    return int(subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True).stdout)


def test_busy_processes_make_the_plan_wait_passively() -> None:
    """Real busy loops, one per core: every sample sees them runnable, and a process that would spin on
    a quiet machine sleeps while it waits (its threads stay: one per core)."""
    n = omp.machine_cores()
    loops = [_detached_busy_loop() for _ in range(n)]
    try:
        time.sleep(0.3)
        seen = omp.busy_others()
        plan = omp.plan_threads(None, 1, own_quota=False)
        child = _child(PLAN.format(before=""))
    finally:
        for pid in loops:
            os.kill(pid, signal.SIGKILL)
    assert seen >= n
    assert (plan.threads, plan.wait) == (n, "passive") and f"{n} core" in plan.why
    assert child["plan"]["threads"] == n and child["omp"] == "passive" and child["torch"] == n
    quiet = omp.plan_threads(None, 1, others=0.0, own_quota=False)  # the same process, nothing busy
    assert (quiet.threads, quiet.wait) == (n, "spin" if n > 1 else "passive")


def test_busy_sample_does_not_count_this_process_or_its_children() -> None:
    """This process's own runnable threads and its children's are not 'others': a thread of ours hashing
    without the GIL and a busy child are counted as ours, which busy_others takes off the machine's count."""
    stop = threading.Event()
    data = os.urandom(1 << 20)

    def work() -> None:
        while not stop.is_set():
            hashlib.sha256(data).digest()  # releases the GIL: the thread stays runnable

    t = threading.Thread(target=work)
    t.start()
    try:
        time.sleep(0.05)
        own = max(omp._own_running() for _ in range(20))
    finally:
        stop.set()
        t.join()
    assert own >= 2
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        family = omp._family()
        assert os.getpid() in family and loop.pid in family
        running = min(omp._own_running(family) for _ in range(5))
    finally:
        loop.kill()
        loop.wait()
    assert running >= 2  # the reading thread and the busy child, in every sample


def test_process_env_carries_the_plan_and_lets_the_user_win() -> None:
    plan = omp.ThreadPlan(3, "passive", "test")
    env = omp.process_env({"PATH": "/bin"}, plan)
    assert env["OMP_NUM_THREADS"] == env["TESTBED_THREADS"] == "3"
    assert env["TESTBED_OMP"] == "passive" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    user = omp.process_env({"TESTBED_OMP": "spin", "OMP_NUM_THREADS": "1"}, plan)
    assert user["TESTBED_OMP"] == "spin" and user["GOMP_SPINCOUNT"] == "10000"
    assert user["OMP_NUM_THREADS"] == user["TESTBED_THREADS"] == "1"


def test_a_child_follows_the_plan_it_was_given_without_sampling() -> None:
    """A child started with process_env's environment runs that plan (threads in torch, wait in libgomp)."""
    env = omp.process_env(_clean_env(), omp.ThreadPlan(2, "spin", "given"))
    got = _child(PLAN.format(before=""), env)
    assert got["plan"] == {"threads": 2, "wait": "spin", "why": "TESTBED_THREADS=2, TESTBED_OMP=spin"}
    assert got["omp"] == "spin" and got["torch"] == min(2, os.cpu_count() or 1)


CHILD = """
import json, os
import testbed, torch
from testbed import omp
from testbed.apps.launch import program_env
env = program_env(omp.ThreadPlan(threads=1, wait="passive"))  # a node sharing the machine
print(json.dumps([omp.in_effect(), omp.own_plan().wait, os.environ.get("OMP_WAIT_POLICY"),
                  os.environ.get("GOMP_SPINCOUNT"), env.get("OMP_WAIT_POLICY"), env.get("GOMP_SPINCOUNT"),
                  omp.describe(env, "node")]))
"""


@pytest.mark.parametrize("policy", ["", "passive", "spin"])
def test_a_fresh_process_and_its_nodes_get_their_policies(policy) -> None:
    """A fresh process sets libgomp's variables before torch loads (its plan's, or TESTBED_OMP's); the
    node environment it builds carries the nodes' policy, not its own."""
    env = {k: v for k, v in program_env(omp.ThreadPlan(threads=1, wait="passive")).items() if k not in DROP}
    if policy:
        env["TESTBED_OMP"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    local, planned, wait, spin, node_wait, node_spin, node = json.loads(out.stdout)
    want_local, want_node = (policy, policy) if policy else (planned, "passive")
    assert local == want_local and node == want_node
    assert (wait, spin) == (("PASSIVE", None) if want_local == "passive" else (None, "10000"))
    assert (node_wait, node_spin) == (("PASSIVE", None) if want_node == "passive" else (None, "10000"))
