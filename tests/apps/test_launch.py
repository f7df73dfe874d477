"""The node-program launcher with real subprocesses: settings, ready lines, logs, deaths, CPU, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.apps import launch
from testbed.apps.inference.settings import DriverSettings, ShardSettings
from testbed.apps.launch import Launcher, LaunchError, LocalHost, NetHost, Program, ProgramFailed
from testbed.hosts.limits import ROLE_DEFAULTS
from testbed.omp import plan_threads
from testbed.spec.errors import SpecError
from testbed.spec.topology import load_topology

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAKE = HERE / "programs" / "fake_node.py"
sys.path.insert(0, str(FAKE.parent))
from fake_node import FakeSettings  # noqa: E402 - the program's own settings class


def fake(name: str, mode: str, host: LocalHost | None = None, service: bool = True, **kw) -> Program:
    return Program(name, FAKE, FakeSettings(mode=mode, **kw), host or LocalHost(name), service=service)


def alive(pid: int) -> bool:
    """Running (not a zombie, not gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---- typed settings ---------------------------------------------------------------------------

def test_settings_round_trip(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    s = DriverSettings(model=str(tmp_path), start=0, end=2, next="tcp://10.0.0.2:5601", hops=["0:2", "2:4"],
                       prompt_ids=[1, 2], max_new_tokens=5, codec="int8", timeout_s=30)
    assert launch.decode_settings(DriverSettings, launch.encode_settings(s)) == s
    # an integer where a number goes is fine, and becomes a float
    got = launch.decode_settings(FakeSettings, '{"mode": "serve", "delay_s": 2}')
    assert got.delay_s == 2.0 and isinstance(got.delay_s, float)


@pytest.mark.parametrize(("text", "field", "why"), [
    ('{"mode": "serve", "colour": 1}', "colour", "unknown setting"),
    ('{"delay_s": 1}', "mode", "missing"),
    ('{"mode": 3}', "mode", "must be a string (got 3)"),
    ('{"mode": "serve", "exit_code": "3"}', "exit_code", "must be an integer (got '3')"),
    ('{"mode": "serve", "exit_code": true}', "exit_code", "must be an integer (got True)"),
    ('{"mode": "serve", "exit_code": 1.5}', "exit_code", "must be an integer"),
    ('{"mode": "serve", "delay_s": NaN}', "(json)", "not valid JSON"),
    ('{"mode": "serve", "delay_s": Infinity}', "(json)", "not valid JSON"),
    ('{"mode": "serve", "then_exit": 1}', "then_exit", "true or false"),
    ('{"mode": "fly"}', "mode", "must be one of serve"),
    ('{"mode": "serve", "delay_s": -1}', "delay_s", "must be >= 0 (got -1.0)"),
    ('["serve"]', "(json)", "must be an object"),
    ("{mode", "(json)", "not valid JSON"),
])
def test_settings_refusals(text: str, field: str, why: str) -> None:
    with pytest.raises(SpecError) as e:
        launch.decode_settings(FakeSettings, text, "fake settings")
    assert e.value.field == field and why in e.value.message
    assert str(e.value).startswith(f"fake settings: {field}: ") and "\n" not in str(e.value)


def test_inference_settings_ranges(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    ok = {"bind": "tcp://10.0.0.1:5601", "model": str(tmp_path), "start": 1, "end": 3}
    launch.decode_settings(ShardSettings, json.dumps(ok))
    for over, field in [({"bind": "tcp://0.0.0.0:5601"}, "bind"), ({"bind": "10.0.0.1:5601"}, "bind"),
                        ({"bind": "tcp://10.0.0.1:70000"}, "bind"), ({"end": 1}, "end"),
                        ({"threads": 0}, "threads"), ({"quant": "int3"}, "quant"),
                        ({"idle_timeout_s": 0}, "idle_timeout_s"), ({"model": str(tmp_path / "no")}, "model"),
                        ({"next": "udp://x:1"}, "next")]:
        with pytest.raises(SpecError, match=f": {field}: "):
            launch.decode_settings(ShardSettings, json.dumps({**ok, **over}))
    drv = {"model": str(tmp_path), "start": 0, "end": 1, "next": "tcp://10.0.0.2:5601"}
    launch.decode_settings(DriverSettings, json.dumps(drv))
    for over, field in [({"max_new_tokens": 0}, "max_new_tokens"), ({"codec": "fp8"}, "codec"),
                        ({"hops": ["0-1"]}, "hops"), ({"prompt_ids": []}, "prompt_ids"),
                        ({"prompt_ids": [1, "2"]}, "prompt_ids"), ({"end": 0, "next": None}, "next"),
                        ({"timeout_s": -1}, "timeout_s")]:
        with pytest.raises(SpecError, match=f": {field}: "):
            launch.decode_settings(DriverSettings, json.dumps({**drv, **over}))


@pytest.mark.parametrize(("script", "args", "why"), [
    ("nodes/shard_node.py", ["--settings", '{"bind": "tcp://0.0.0.0:5999", "model": "/", "start": 0, '
                             '"end": 1}'],
     "shard_node settings: bind: must name one address of this host, not a wildcard"),
    ("nodes/shard_node.py", ["--settings", '{"bind": "tcp://127.0.0.1:5999", "model": "/", "start": 0, '
                             '"end": 1, "threads": "2"}'],
     "shard_node settings: threads: must be an integer"),
    ("nodes/driver.py", ["--settings", '{"model": "/nowhere", "start": 0, "end": 1, "max_new_tokens": 0}'],
     "driver settings: max_new_tokens: must be in 1..100000 (got 0)"),
    ("nodes/driver.py", ["--settings", '{"model": "/", "start": 0, "end": 1, "temperature": 0.5}'],
     "driver settings: temperature: unknown setting"),
    ("nodes/driver.py", ["--prompt", "hi"], "driver: expected --settings JSON (got --prompt hi)"),
])
def test_bad_settings_end_a_program_with_one_line(script: str, args: list[str], why: str) -> None:
    """On arrival, in the real program: exit code 2, one line, no traceback, before torch loads."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert time.monotonic() - t0 < 60


# ---- hosts and the thread plan ----------------------------------------------------------------

def test_net_host_limits_come_from_the_topology(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text("name: t\nnodes:\n  phone: {role: device}\n  mec: {role: edge, cpu: 0.75}\n"
                 "  cloud: {role: cloud}\nlinks:\n  - between: [phone, mec]\n  - between: [mec, cloud]\n")
    net = SimpleNamespace(topo=load_topology(f))
    assert NetHost(net, "mec").cpu_limit == 0.75  # the node's own
    assert NetHost(net, "phone").cpu_limit == ROLE_DEFAULTS["device"].cpu  # its role's default
    assert NetHost(net, "cloud").cpu_limit is None


@pytest.mark.slow
def test_each_program_gets_its_thread_plan(tmp_path: Path) -> None:
    hosts = [LocalHost("small", cpu_limit=1.0), LocalHost("big", cpu_limit=None)]
    with Launcher(tmp_path, sharers=2) as run:
        runs = run.start([fake(f"r-{h.name}", "report", h, service=False) for h in hosts]
                         + [Program("fixed", FAKE, FakeSettings(mode="report"), LocalHost("x"), service=False,
                                    threads=3)])
        run.wait_exit(runs, 120)
        got = [json.loads(r.stdout()[-1]) for r in runs]
    want = [plan_threads(1.0, 2), plan_threads(None, 2)]
    for g, r, w in zip(got, runs, [*want, None], strict=True):
        n = w.threads if w else 3
        assert g["threads"] == n == r.plan.threads == r.settings.threads  # settings and plan agree
        assert g["OMP_NUM_THREADS"] == g["MKL_NUM_THREADS"] == str(n)
        assert g["TESTBED_OMP"] == (os.environ.get("TESTBED_OMP") or r.plan.wait)
    # sharers by default: the compute programs running once start returns
    with Launcher(tmp_path / "alone") as run:
        (r,) = run.start([fake("one", "report", LocalHost("h", cpu_limit=None), service=False)])
        run.wait_exit([r], 120)
    # threads as planned; the wait itself depends on what else is busy at that moment (sampled)
    alone = plan_threads(None, 1)
    assert r.plan.threads == alone.threads and r.plan.wait in ("spin", "passive")


@pytest.mark.slow
def test_programs_that_take_turns_get_a_lone_plan(tmp_path: Path) -> None:
    """Three programs of a pipeline without overlap: each the threads and the wait of a lone process
    (spinning where nothing else on the machine is busy), never the passive wait of programs that
    compute at once."""
    hosts = [LocalHost(f"h{i}", cpu_limit=None) for i in range(3)]
    with Launcher(tmp_path, sharers=1) as run:
        runs = run.start([fake(f"t-{h.name}", "report", h, service=False) for h in hosts])
        run.wait_exit(runs, 120)
        got = [json.loads(r.stdout()[-1]) for r in runs]
    lone = plan_threads(None, 1)
    for g, r in zip(got, runs, strict=True):
        assert g["threads"] == r.plan.threads == lone.threads
        assert "compute at once" not in r.plan.why, r.plan.why
        assert g["TESTBED_OMP"] == (os.environ.get("TESTBED_OMP") or r.plan.wait)


# ---- ready, logs, deaths ----------------------------------------------------------------------

@pytest.mark.slow
def test_ready_timeout_names_the_program_and_stops_it(tmp_path: Path) -> None:
    with Launcher(tmp_path) as run:
        (r,) = run.start([fake("sleepy", "hang", log_lines=2)])
        t0 = time.monotonic()
        why = r"sleepy not ready after 3 s; its whole log: .*sleepy.log"
        with pytest.raises(ProgramFailed, match=why) as e:
            run.wait_ready([r], timeout_s=3)
        assert 3 <= time.monotonic() - t0 < 20
        assert "log line 1" in str(e.value)
    assert not alive(r.pid) and r.returncode is not None


@pytest.mark.slow
def test_death_before_ready_shows_the_tail_and_keeps_the_log_whole(tmp_path: Path) -> None:
    n = 3000  # far more than the tail shown
    with Launcher(tmp_path) as run, pytest.raises(ProgramFailed) as e:
        run.wait_ready(run.start([fake("crash", "die-before-ready", log_lines=n, exit_code=7)]), 120)
    msg = str(e.value)
    assert msg.startswith("crash on crash exited with code 7 before it was ready; its whole log: ")
    assert f"log line {n - 1}" in msg and "log line 0\n" not in msg and len(msg) < 4000
    assert e.value.log == tmp_path / "crash.log"
    lines = e.value.log.read_text().splitlines()
    assert sum(1 for ln in lines if ln.startswith("log line ")) == n  # every line, none cut
    assert lines[0].startswith("=== crash on crash at ")


@pytest.mark.slow
def test_a_death_during_the_run_is_noticed_at_once(tmp_path: Path) -> None:
    """A service that dies while the launcher waits for a long task fails the wait within a second."""
    with Launcher(tmp_path) as run:
        svc, task = run.start([fake("svc", "die-after-ready", delay_s=2.0, exit_code=5),
                               fake("task", "hang", service=False)])
        run.wait_ready([svc], 120)
        with pytest.raises(ProgramFailed, match="svc on svc exited with code 5 during the run"):
            run.wait_exit([task], timeout_s=300)
        late = time.monotonic() - svc.exited_at
        assert late < 1.5, late
        assert alive(task.pid)
    assert not alive(task.pid)  # the stop ended the task too
    # check() sees it too, without waiting
    with Launcher(tmp_path / "b") as run:
        (svc,) = run.start([fake("svc", "die-after-ready", delay_s=0.0)])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                run.check()
            except ProgramFailed:
                break
            time.sleep(0.05)
        else:
            pytest.fail("check() never reported the exited service")


@pytest.mark.slow
def test_task_exit_and_output(tmp_path: Path) -> None:
    with Launcher(tmp_path) as run:
        (r,) = run.start([fake("t", "report", service=False)])
        run.wait_exit([r], 120)
        run.check()  # a task that ends is no failure
        run.wait_ready([r], 1)  # ready, then gone: still was ready
    assert r.cpu_ms is not None and 0 <= r.cpu_ms < 500  # the clock started at its ready line
    assert r.returncode == 0 and r.stdout()[0].startswith("READY") and json.loads(r.stdout()[-1])["threads"]
    assert r.stdout()[-1] in r.log.read_text()  # stdout goes to the log as well
    with Launcher(tmp_path / "slow") as run, pytest.raises(LaunchError, match="t did not finish in 2 s"):
        run.wait_exit(run.start([fake("t", "hang", service=False)]), 2)


# ---- CPU time -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_cpu_time_from_ready_to_stop(tmp_path: Path) -> None:
    with Launcher(tmp_path) as run:
        burner, idle, task = run.start([fake("burner", "burn", cpu_s=1.0), fake("idle", "serve"),
                                        fake("task", "burn", cpu_s=0.6, then_exit=True, service=False)])
        run.wait_ready([burner, idle], 120)
        run.wait_exit([task], 120)
        deadline = time.monotonic() + 120
        while "BURNT" not in burner.stdout() and time.monotonic() < deadline:
            time.sleep(0.05)
    # the interpreter's start-up (before the ready line) is not counted; the burn is
    assert 950 <= burner.cpu_ms < 1600, burner.cpu_ms
    assert 550 <= task.cpu_ms < 1200, task.cpu_ms  # ended by itself: read before it was reaped
    assert task.exit_cpu_ms is not None
    assert idle.cpu_ms < 400, idle.cpu_ms


def test_the_ready_line_states_the_cpu_time_so_far() -> None:
    assert launch._ready_cpu_ms("READY cpu_ms=812.5 tcp://10.0.0.1:5601") == 812.5
    for line in ("READY", "READY tcp://x:1", "READY cpu_ms=nan", "READY cpu_ms=-1", "READY cpu_ms=x"):
        assert launch._ready_cpu_ms(line) is None  # then the launcher reads /proc itself


# ---- stop -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stop_kills_what_ignores_sigterm_and_ends_everything_on_errors(tmp_path: Path) -> None:
    t0 = time.monotonic()
    # the grace leaves a polite program time to exit on a loaded machine; the stubborn one is killed
    with pytest.raises(RuntimeError, match="boom"), Launcher(tmp_path, grace_s=3.0) as run:
        rs = run.start([fake("stubborn", "stubborn"), fake("polite", "serve")])
        run.wait_ready(rs, 120)
        raise RuntimeError("boom")
    stubborn, polite = rs
    assert stubborn.returncode == -signal.SIGKILL and polite.returncode == 0
    assert not alive(stubborn.pid) and not alive(polite.pid)
    assert "SIGTERM ignored" in stubborn.log.read_text()
    assert time.monotonic() - t0 < 120
    with pytest.raises(LaunchError, match="stopped"):
        run.start([fake("again", "serve")])


def test_program_names_are_unique_in_a_run(tmp_path: Path) -> None:
    with Launcher(tmp_path) as run, pytest.raises(LaunchError, match="unique"):
        run.start([fake("a", "serve"), fake("a", "serve")])
    assert run.procs == []


PARENT = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from fake_node import FakeSettings
from testbed.apps.launch import Launcher, LocalHost, Program
with Launcher(Path(sys.argv[1]), grace_s=4.0) as run:
    (r,) = run.start([Program("stubborn", sys.argv[3], FakeSettings(mode="stubborn"), LocalHost())])
    run.wait_ready([r], 120)
    print(f"CHILD {r.pid}", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_stop_does_not_cut_it_short(tmp_path: Path) -> None:
    """Ctrl-C starts the stop (SIGTERM, ignored by the child); a second Ctrl-C while the stop waits
    out its grace period is held: the stop still ends with SIGKILL, nothing survives."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), str(FAKE.parent), str(FAKE)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
    child = None
    try:
        line = parent.stdout.readline()
        assert line.startswith("CHILD "), parent.stderr.read()
        child = int(line.split()[1])
        parent.send_signal(signal.SIGINT)
        log = tmp_path / "stubborn.log"
        deadline = time.monotonic() + 60
        while "SIGTERM ignored" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "SIGTERM ignored" in log.read_text(), "the stop never began"
        assert alive(child)  # the stop is in its grace period now
        parent.send_signal(signal.SIGINT)
        rc = parent.wait(timeout=60)
        err = parent.stderr.read()
        assert rc in (-signal.SIGINT, 130), err  # the interrupt still ends the parent
        assert "KeyboardInterrupt" in err
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the child survived: the second Ctrl-C cut the stop short"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


@dataclass(frozen=True)
class _NotSettings:
    x: object = None


def test_settings_types_the_decoder_does_not_know_are_a_programming_error() -> None:
    with pytest.raises(TypeError, match="not supported"):
        launch.decode_settings(_NotSettings, '{"x": 1}')
    with pytest.raises(TypeError, match="dataclass instance"):
        launch.encode_settings({"mode": "serve"})
