"""The node-program launcher: every application, and the loopback path, starts its programs here.

A node program is a script in ``nodes/`` that takes one typed settings object: a dataclass that
the launcher serializes once (JSON, ``--settings``) and the program checks field by field on
arrival (:func:`read_settings`: unknown or missing keys, wrong types, out-of-range values end the
program with one line ``PROGRAM settings: field: problem (got value)`` and exit code 2).

:class:`Launcher` starts programs on hosts (anything with ``popen(argv, **kw)``: a node of an
emulated network, :class:`NetHost`, or this machine, :class:`LocalHost`) and then:

- gives each compute program its threads and OpenMP wait policy from the cores its host may use
  and the compute programs sharing the machine (``testbed.omp.plan_threads``); the count reaches
  the program in its settings (``threads``) and its environment;
- waits for each program's ``READY`` line (:meth:`Launcher.wait_ready`, with a timeout);
- keeps each program's whole log (stderr and stdout) in ``LOGS/NAME.log``: a failure names that
  file and shows its tail;
- notices a program that dies while the run goes on (a monitor thread; every wait raises
  :class:`ProgramFailed` within a fraction of a second, not at the end of the run);
- measures each program's CPU time from its ready line (which states the CPU time used so far) to
  its stop or its own exit (``/proc/PID/stat``, read before the exited process is reaped);
- stops everything on every way out (SIGTERM, SIGKILL after a grace period), and a second
  Ctrl-C arriving during the stop is held until the stop is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from testbed.omp import ThreadPlan, describe, plan_threads, process_env
from testbed.spec.errors import SpecError, TestbedError

REPO = Path(__file__).resolve().parents[2]
NODES = REPO / "nodes"
READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 5.0
POLL_S = 0.1
TAIL_CHARS = 3000
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY = "READY"

T = TypeVar("T")


class LaunchError(TestbedError, RuntimeError):
    """A program could not be started, was not ready in time, failed or did not finish."""


class ProgramFailed(LaunchError):
    """A program exited when it should not have (or not ready in time); the message has its log's tail."""

    def __init__(self, name: str, log: Path, what: str) -> None:
        self.name, self.log = name, log
        super().__init__(f"{name} {what}; its whole log: {log}\n{tail(log)}")


# ---- typed settings -----------------------------------------------------------------------------

def encode_settings(settings: Any) -> str:
    """One program's settings as the JSON text it receives (``--settings``)."""
    if not dataclasses.is_dataclass(settings) or isinstance(settings, type):
        raise TypeError(f"settings must be a dataclass instance, not {type(settings).__name__}")
    return json.dumps(dataclasses.asdict(settings), allow_nan=False, separators=(",", ":"))


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[hint]


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of the settings field type ``hint`` (the few types settings use)."""
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"settings field type {hint!r} is not supported")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def decode_settings(cls: type[T], text: str, source: str = "settings") -> T:
    """The ``cls`` instance that ``text`` describes; SpecError (one line) for anything wrong.

    After the types, ``cls.problems()`` (where defined) names out-of-range values: it yields
    ``(field, problem)`` pairs and the first one is reported with the field's value.
    """
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise SpecError(source, "(json)", f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(source, "(json)", f"must be an object of fields (got {type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise SpecError(source, str(key), f"unknown setting (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(source, name, "missing")
            continue
        value = data[name]
        if not _conforms(value, hints[name]):
            raise SpecError(source, name, f"must be {_type_name(hints[name])} (got {value!r})")
        values[name] = float(value) if hints[name] is float else value
    obj = cls(**values)
    for name, problem in getattr(obj, "problems", lambda: ())():
        raise SpecError(source, name, f"{problem} (got {getattr(obj, name, None)!r})")
    return obj


def read_settings(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """A node program's settings from ``--settings JSON``; one line on stderr and exit 2 if bad."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).stem
    if argv in (["-h"], ["--help"]):
        print(f"usage: {prog} --settings JSON\nfields of {cls.__name__}: "
              + ", ".join(f"{f.name}: {f.type}" for f in dataclasses.fields(cls)))  # type: ignore[arg-type]
        raise SystemExit(0)
    if len(argv) == 2 and argv[0] == "--settings":
        text = argv[1]
    elif len(argv) == 1 and argv[0].startswith("--settings="):
        text = argv[0].split("=", 1)[1]
    else:
        print(f"{prog}: expected --settings JSON (got {' '.join(argv) or 'no arguments'})", file=sys.stderr)
        raise SystemExit(2)
    try:
        return decode_settings(cls, text, f"{prog} settings")
    except SpecError as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2) from None


def exit_now(code: int) -> typing.NoReturn:
    """End a node program that is done: flush its output and leave without finalizing the interpreter
    (tearing down torch and transformers takes seconds on a loaded machine, which would eat the
    launcher's stop grace period; nothing is left to write)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def announce_ready(detail: str = "") -> None:
    """A program's ready line: the launcher starts its CPU clock here.  The line carries the CPU time
    used so far (all threads, as /proc/PID/stat counts it), so a launcher that reads it late under
    load still starts the clock at the right value.  It is read where the launcher reads the end
    (/proc, in clock ticks): a precise start against a tick-truncated end would bias short runs down."""
    used = cpu_ms(os.getpid())
    used = time.process_time() * 1e3 if used is None else used
    print(f"{READY} cpu_ms={used:.1f} {detail}".rstrip(), flush=True)


def _ready_cpu_ms(line: str) -> float | None:
    """The ``cpu_ms=`` a ready line carries, if any."""
    for word in line.split()[1:]:
        if word.startswith("cpu_ms="):
            with contextlib.suppress(ValueError):
                value = float(word.split("=", 1)[1])
                return value if math.isfinite(value) and value >= 0 else None
    return None


# ---- hosts --------------------------------------------------------------------------------------

class Host(Protocol):
    """Where a program runs: a name, the cores it may use (None: unlimited) and ``popen``."""

    @property
    def name(self) -> str: ...

    @property
    def cpu_limit(self) -> float | None: ...

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen: ...


@dataclass(frozen=True)
class LocalHost:
    """This machine, outside any network namespace (the loopback path, tests)."""

    name: str = "local"
    cpu_limit: float | None = None

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        # its own session: a terminal's Ctrl-C reaches the launcher, which stops the program itself
        return subprocess.Popen(argv, start_new_session=True, **kw)


@dataclass(frozen=True)
class NetHost:
    """A host of a running emulated network (``EmulatedNetwork``); its CPU limit from the topology."""

    net: Any
    name: str

    @property
    def cpu_limit(self) -> float | None:
        from testbed.hosts.limits import resolve_limits

        return resolve_limits(self.net.topo.nodes[self.name], self.net.topo.source).cpu

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        return self.net.popen(self.name, argv, **kw)


# ---- programs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Program:
    """One program to start.  ``name`` is unique in a run (its log is ``NAME.log``)."""

    name: str
    script: str | Path  # a file name in nodes/, or a path
    settings: Any  # the program's settings dataclass; a ``threads`` field is set from the thread plan
    host: Host
    service: bool = True  # runs until stopped: exiting earlier fails the run
    compute: bool = True  # computes: shares the machine's cores with the run's other compute programs
    threads: int | None = None  # a fixed thread count instead of the plan's (benchmarks)


def cpu_ms(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in ms; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) * 1000.0 / CLK_TCK


def tail(log: Path, chars: int = TAIL_CHARS) -> str:
    """The end of a log file, whole lines where possible."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(log unreadable: {e})"
    if len(text) >= chars and "\n" in text:
        text = text.split("\n", 1)[1]
    return text.rstrip() or "(log is empty)"


@dataclass
class Running:
    """A started program and what the launcher saw of it (times are ``time.monotonic()``)."""

    program: Program
    popen: subprocess.Popen
    log: Path
    plan: ThreadPlan
    settings: Any
    started_at: float
    ready_at: float | None = None
    ready_cpu_ms: float | None = None
    last_cpu_ms: float | None = None
    stop_cpu_ms: float | None = None  # sampled just before the stop's SIGTERM
    exit_cpu_ms: float | None = None  # read from the exited (not yet reaped) process
    exited_at: float | None = None
    stopping: bool = False
    lines: list[tuple[float, str]] = field(default_factory=list)  # stdout, with the time each was read
    _reader: threading.Thread | None = None
    _log_file: IO[bytes] | None = None

    @property
    def name(self) -> str:
        return self.program.name

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    @property
    def cpu_ms(self) -> float | None:
        """CPU time from the ready line to the stop (or to its own exit); None if never ready."""
        if self.ready_cpu_ms is None:
            return None
        end = next((v for v in (self.stop_cpu_ms, self.exit_cpu_ms, self.last_cpu_ms) if v is not None),
                   self.ready_cpu_ms)
        return round(max(0.0, end - self.ready_cpu_ms), 1)

    def stdout(self) -> list[str]:
        return [line for _, line in self.lines]

    def tail(self, chars: int = TAIL_CHARS) -> str:
        return tail(self.log, chars)


def program_env(plan: ThreadPlan, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node program that follows ``plan``."""
    env = process_env(os.environ if base is None else base, plan)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def default_logs_dir(kind: str) -> Path:
    """Where a run keeps its programs' logs unless told: ``results/logs/KIND-DATE-TIME-PID``."""
    return Path("results") / "logs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


@contextlib.contextmanager
def sigint_deferred() -> Iterator[list[int]]:
    """Hold Ctrl-C while the block runs (main thread only); yields the list of held signals."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    old = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if old is None else old)


class Launcher:
    """Starts programs, watches them, stops them all; a context manager (the stop runs on exit).

    ``logs``: the run's log folder (created).  ``sharers``: compute programs that share the
    machine's cores at once; by default the compute programs running once a ``start`` returns.
    ``sharers=1`` for programs that take turns (a pipeline without overlap): each gets the plan of a
    lone process, its threads and its wait.
    """

    def __init__(self, logs: str | Path, *, sharers: int | None = None,
                 grace_s: float = STOP_GRACE_S) -> None:
        self.logs = Path(logs)
        self.sharers = sharers
        self.grace_s = grace_s
        self.procs: list[Running] = []
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._reap_lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._stopped = False

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # an interrupt already on its way out needs no second one from a Ctrl-C held during the stop
        self.stop(reraise_held=not (exc_type and issubclass(exc_type, KeyboardInterrupt)))

    # -- start -----------------------------------------------------------------------------------

    def start(self, programs: Iterable[Program]) -> list[Running]:
        """Start ``programs`` (in order); returns their handles.  LaunchError if one cannot start."""
        programs = list(programs)
        if self._stopped:
            raise LaunchError("this launcher has been stopped")
        names = [p.name for p in self.procs] + [p.name for p in programs]
        if len(set(names)) != len(names):
            raise LaunchError(f"program names must be unique in a run: {', '.join(names)}")
        computing = sum(1 for r in self.procs if r.program.compute and r.exited_at is None)
        sharers = self.sharers or computing + sum(1 for p in programs if p.compute)
        self.logs.mkdir(parents=True, exist_ok=True)
        started = []
        with sigint_deferred() as held:  # a program started is a program registered for the stop
            for prog in programs:
                started.append(self._start_one(prog, max(1, sharers) if prog.compute else 1))
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="launcher-monitor", daemon=True)
            self._monitor.start()
        if held:
            raise KeyboardInterrupt
        return started

    def _start_one(self, prog: Program, sharers: int) -> Running:
        plan = plan_threads(prog.host.cpu_limit, sharers)
        if prog.threads is not None:
            plan = ThreadPlan(threads=prog.threads, wait=plan.wait)
        settings = prog.settings
        if any(f.name == "threads" for f in dataclasses.fields(settings)):
            settings = dataclasses.replace(settings, threads=plan.threads)
        script = Path(prog.script) if Path(prog.script).is_absolute() else NODES / prog.script
        argv = [sys.executable, str(script), "--settings", encode_settings(settings)]
        env = program_env(plan)
        log = self.logs / f"{prog.name}.log"
        log_file = open(log, "ab")  # noqa: SIM115 - closed by stop(); appends: a rerun keeps the old
        log_file.write(f"=== {prog.name} on {prog.host.name} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: "
                       f"{plan.threads} thread(s), OpenMP wait {describe(env, role='node')}\n"
                       f"=== {' '.join(argv)}\n".encode())
        log_file.flush()
        try:
            popen = prog.host.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
                                    env=env)
        except Exception as e:
            log_file.close()
            raise LaunchError(f"{prog.name}: could not start on {prog.host.name}: {e}") from e
        run = Running(prog, popen, log, plan, settings, time.monotonic(), _log_file=log_file)
        run._reader = threading.Thread(target=self._read, args=(run,), name=f"read-{prog.name}", daemon=True)
        with self._cond:
            self.procs.append(run)
        run._reader.start()
        return run

    # -- watching --------------------------------------------------------------------------------

    def _read(self, run: Running) -> None:
        """Copy the program's stdout into its log, line by line; note the ready line."""
        assert run.popen.stdout is not None and run._log_file is not None
        for raw in run.popen.stdout:
            now = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\n")
            if run.ready_at is None and line.split(" ", 1)[0] == READY:
                said = _ready_cpu_ms(line)
                run.ready_cpu_ms = said if said is not None else cpu_ms(run.pid)
                run.ready_at = now
            with contextlib.suppress(ValueError, OSError):
                run._log_file.write(raw)
                run._log_file.flush()
            with self._cond:
                run.lines.append((now, line))
                self._cond.notify_all()

    def _watch(self) -> None:
        """Note every exit within ``POLL_S``, even while nobody waits; sample CPU times meanwhile."""
        while not self._halt.wait(POLL_S):
            changed = False
            for run in list(self.procs):
                if run.exited_at is None:
                    changed |= self.exited(run)
                    if run.exited_at is None:
                        run.last_cpu_ms = cpu_ms(run.pid) or run.last_cpu_ms
            if changed:
                with self._cond:
                    self._cond.notify_all()

    def exited(self, run: Running) -> bool:
        """Whether ``run`` exited; the first to see it reads its CPU time before reaping it."""
        if run.exited_at is not None:
            return True
        with self._reap_lock:
            if run.exited_at is not None:
                return True
            try:
                gone = os.waitid(os.P_PID, run.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:  # reaped elsewhere (the network's teardown)
                gone = True
            if not gone and run.popen.returncode is None:
                return False
            run.exit_cpu_ms = cpu_ms(run.pid)  # an exited, unreaped process still shows its threads' total
            run.popen.wait()
            run.exited_at = time.monotonic()
            return True

    @staticmethod
    def _drained(run: Running, wait_s: float = 0.0) -> bool:
        """Whether all of ``run``'s stdout has been read (its ready line noted, its log complete)."""
        if run._reader is not None:
            run._reader.join(timeout=wait_s)
        return run._reader is None or not run._reader.is_alive()

    def check(self) -> None:
        """ProgramFailed for the first service program that exited although nobody stopped it."""
        for run in self.procs:
            if run.program.service and not run.stopping and self.exited(run):
                self._drained(run, 2.0)
                when = "before it was ready" if run.ready_at is None else "during the run"
                raise ProgramFailed(run.name, run.log, f"on {run.program.host.name} exited with code "
                                    f"{run.returncode} {when}")

    def _wait(self, done: typing.Callable[[], bool], deadline: float) -> bool:
        """Until ``done()`` (True) or the deadline (False); raises as soon as a service dies."""
        while True:
            self.check()
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                self._cond.wait(min(left, 0.25))

    def wait_ready(self, runs: Sequence[Running], timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every one of ``runs`` printed its ready line; ProgramFailed if one exits first or
        the timeout passes."""
        def done() -> bool:
            for run in runs:
                if run.ready_at is None and self.exited(run):
                    self._drained(run, 2.0)  # its ready line may still be in the pipe
                    if run.ready_at is None:
                        raise ProgramFailed(run.name, run.log, f"on {run.program.host.name} exited with "
                                            f"code {run.returncode} before it was ready")
            return all(r.ready_at is not None for r in runs)

        if not self._wait(done, time.monotonic() + timeout_s):
            late = [r for r in runs if r.ready_at is None]
            raise ProgramFailed(late[0].name, late[0].log, f"not ready after {timeout_s:.0f} s"
                                + (f" (nor {', '.join(r.name for r in late[1:])})" if late[1:] else ""))

    def wait_exit(self, runs: Sequence[Running], timeout_s: float) -> None:
        """Until every one of ``runs`` exited (their stdout read to the end); LaunchError on timeout."""
        def done() -> bool:
            return all(self.exited(r) and self._drained(r) for r in runs)

        if not self._wait(done, time.monotonic() + timeout_s):
            late = [r.name for r in runs if not self.exited(r)]
            raise LaunchError(f"{', '.join(late)} did not finish in {timeout_s:.0f} s")

    # -- stop ------------------------------------------------------------------------------------

    def stop(self, reraise_held: bool = True) -> None:
        """SIGTERM every program, SIGKILL what is left after the grace period, close the logs.

        Ctrl-C during the stop is held until it is complete, then raised (``reraise_held``)."""
        if self._stopped:
            return
        with sigint_deferred() as held:
            self._stop()
        if held and reraise_held:
            raise KeyboardInterrupt

    def _stop(self) -> None:
        self._stopped = True
        self._halt.set()
        if self._monitor is not None:
            self._monitor.join()
        alive = [r for r in self.procs if not self.exited(r)]
        for run in alive:
            run.stopping = True
            run.stop_cpu_ms = cpu_ms(run.pid)
            with contextlib.suppress(ProcessLookupError):
                run.popen.terminate()
        for r in self.procs:
            r.stopping = True
        deadline = time.monotonic() + self.grace_s
        for run in alive:
            try:
                run.popen.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    run.popen.kill()
                run.popen.wait()
        for run in self.procs:
            run.exited_at = run.exited_at or time.monotonic()
            if run._reader is not None:
                run._reader.join(timeout=2.0)  # EOF follows the exit (unless a grandchild holds the pipe)
                if run._reader.is_alive():
                    continue  # closing a pipe another thread reads would block: the thread ends with it
            if run.popen.stdout is not None:
                run.popen.stdout.close()
            if run._log_file is not None:
                run._log_file.close()
