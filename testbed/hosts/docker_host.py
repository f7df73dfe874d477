"""The ``docker`` runtime: a Mininet host whose shell and processes live in a Docker container.

Containernet-style: each node is a container started with ``--network none`` from the
offline node image (:mod:`testbed.hosts.images`), kept alive by ``sleep``.  The node's
Mininet shell is started with ``nsenter -t <container pid> -n -m -u -i -r -w``, i.e. in the
container's network, mount, UTS and IPC namespaces, and joins the container's cgroups.
Mininet therefore moves interfaces into the container and configures addresses and routes
exactly as for a process host, and every process the testbed starts on the node
(``popen``/``cmd``: shard nodes, iperf3, ping) runs inside the container: its filesystem,
network, hostname and cgroup (so ``--cpus`` and ``--memory`` apply).

Containers share the host's PID namespace (``--pid host``): processes attached from
outside keep their PIDs, so ``Popen.terminate``/``wait`` behave exactly as for a process
host, and the container's ``/proc`` shows them (``/proc/self``, ``/proc/net`` work inside).

Read-only bind mounts at the same paths as on the host (so argv, ``sys.executable`` and
``PYTHONPATH`` built on the host work unchanged): the repository, the venv (made from
Debian's ``/usr/bin/python3`` 3.11.2, the interpreter the bookworm image has, so its
compiled wheels load), and the model cache.  ``/tmp`` is bind-mounted read-write so
temporary files the testbed hands to nodes (logs, test models) are shared as for process
hosts; a results directory, when given, too.  ``/proc/sys`` is left writable (Docker's
read-only path list minus ``/proc/sys``) because the node's per-namespace ``net.*``
sysctls are set from inside, as on a process host.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from mininet.node import Host

from testbed.hosts import docker_engine as de
from testbed.hosts.images import ensure_image, inputs_hash
from testbed.hosts.limits import Limits
from testbed.hosts.process_host import SHARES_WEIGHT

REPO = Path(__file__).resolve().parents[2]
RESULTS_ENV = "TESTBED_RESULTS_DIR"
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger"]
_INIT = 'echo "$(hostname) up: $(nproc) cpus visible, $(grep MemTotal /proc/meminfo)"; exec sleep infinity'


def model_cache_dirs() -> list[Path]:
    """Where converted model checkpoints live (``testbed.model.loading``; not imported here,
    that would import torch), plus ``TESTBED_CACHE`` when set."""
    dirs = [Path.home() / ".cache" / "edgellm-testbed"]
    loading = sys.modules.get("testbed.model.loading")
    if loading is not None:
        with contextlib.suppress(Exception):
            dirs.append(loading.cache_root())
    if os.environ.get("TESTBED_CACHE"):
        dirs.append(Path(os.environ["TESTBED_CACHE"]))
    return [d for i, d in enumerate(dirs) if not any(d.is_relative_to(o) for o in dirs[:i])]


def default_binds(results_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """The Docker SDK ``volumes`` mapping: host path -> same path in the container."""
    ro = [REPO, Path(sys.prefix), *model_cache_dirs()]
    rw = [Path("/tmp")] + ([results_dir] if results_dir else [])
    binds: dict[str, dict[str, str]] = {}
    for p in ro:
        p.mkdir(parents=True, exist_ok=True)
        binds[str(p.resolve())] = {"bind": str(p.resolve()), "mode": "ro"}
    for p in rw:
        p.mkdir(parents=True, exist_ok=True)
        binds[str(p.resolve())] = {"bind": str(p.resolve()), "mode": "rw"}
    return binds


_CLIENTS: dict[str | None, Any] = {}
_IMAGES: dict[str, str] = {}


def _client(node: str) -> Any:
    """One checked Docker client per process and ``DOCKER_HOST`` (the first call pings the engine)."""
    where = os.environ.get("DOCKER_HOST")
    if where not in _CLIENTS:
        _CLIENTS[where] = de.engine("<topology>", f"nodes.{node}.runtime")
    return _CLIENTS[where]


def _image(client: Any) -> str:
    """The node image tag, built if missing; checked once per process and build-input hash."""
    key = inputs_hash()
    if key not in _IMAGES:
        _IMAGES[key] = ensure_image(client=client, quiet=False).tag
    return _IMAGES[key]


def container_name(run_id: str, node: str) -> str:
    return f"edgellm-{run_id}-{node}"


def _weigh_parents(run_id: str) -> None:
    """cgroup v1: give /testbed and /testbed/<run> the process hosts' weight (docker made them)."""
    cpu = Path("/sys/fs/cgroup/cpu/testbed")
    for d in (cpu, cpu / run_id):
        with contextlib.suppress(OSError):
            (d / "cpu.shares").write_text(str(SHARES_WEIGHT))


def cgroup_parent(client: Any, run_id: str) -> str:
    """Where the run's containers go: ``/testbed/<run>`` under docker's cgroupfs driver, the slice
    ``testbed-<run>.slice`` (systemd places it under ``testbed.slice``) under its systemd driver,
    which takes nothing else (Debian 12 with systemd and cgroup v2, as in the VM)."""
    driver = client.info().get("CgroupDriver", "cgroupfs")
    return f"testbed-{run_id}.slice" if driver == "systemd" else f"/testbed/{run_id}"


def start_container(client: Any, image: str, name: str, node: str, run_id: str, limits: Limits,
                    binds: dict[str, dict[str, str]]) -> Any:
    """Run the node container (detached, no network, labelled, limited); returns it once running."""
    kw: dict[str, Any] = {}
    # docker refuses a CPU limit above the machine's cores (a 1-vCPU VM); such a limit limits nothing
    if limits.cpu is not None and limits.cpu < (os.cpu_count() or 1):
        kw["nano_cpus"] = limits.nano_cpus()
    if limits.memory_mb is not None:
        kw["mem_limit"] = kw["memswap_limit"] = limits.memory_bytes()
    # Same cgroup placement and weight as process hosts (testbed.hosts.process_host): under
    # /testbed/<run>, weighing SHARES_WEIGHT, so both runtimes compete equally on a loaded machine.
    hc = client.api.create_host_config(network_mode="none", pid_mode="host", binds=binds,
                                       cgroup_parent=cgroup_parent(client, run_id), cpu_shares=SHARES_WEIGHT,
                                       **kw)
    hc["ReadonlyPaths"] = READONLY_PATHS  # Docker's default list minus /proc/sys
    cid = client.api.create_container(
        image, ["sh", "-c", _INIT], name=name, hostname=node, working_dir="/", host_config=hc,
        labels={de.LABEL: "1", de.RUN_LABEL: run_id, de.NODE_LABEL: node},
    )["Id"]
    container = client.containers.get(cid)
    try:
        container.start()
        _weigh_parents(run_id)
    except BaseException:
        de.remove_container(container)
        raise
    return container


class DockerHost(Host):
    """A Mininet host backed by a container; same constructor keywords as ``ProcessHost``."""

    def __init__(self, name: str, run_id: str = "", cpu: float | None = None, memory_mb: int | None = None,
                 image: str | None = None, results_dir: str | Path | None = None, **params) -> None:
        self.run_id = run_id or secrets.token_hex(3)[:5]
        self.limits = Limits(cpu=cpu, memory_mb=memory_mb)
        rd = results_dir or os.environ.get(RESULTS_ENV)
        self.results_dir = Path(rd) if rd else None
        self.client = _client(name)
        self.image = image or _image(self.client)
        t0 = time.monotonic()
        self.container = start_container(self.client, self.image, container_name(self.run_id, name), name,
                                         self.run_id, self.limits, default_binds(self.results_dir))
        self._starting_shell = False
        try:
            self.cpid = de.container_pid(self.container)
            self.cgroup_files = de.cgroup_procs_files(self.cpid)
            self.start_s = time.monotonic() - t0
            Host.__init__(self, name, **params)
            self.attach_s = time.monotonic() - t0 - self.start_s
        except BaseException:
            de.remove_container(self.container)
            raise

    # --- process placement ------------------------------------------------------------

    def _join(self) -> None:
        de.join_cgroups(self.cgroup_files)

    def _in_container(self, path: str) -> bool:
        return os.path.isdir(f"/proc/{self.cpid}/root{path}")

    def startShell(self, mnopts: str | None = None) -> None:  # noqa: N802 - Mininet's name
        """Mininet's shell, but in the container's namespaces and cgroups (see ``_popen``)."""
        self._starting_shell = True
        try:
            Host.startShell(self, mnopts)
        finally:
            self._starting_shell = False

    def _nsenter(self, cwd: str = "/") -> list[str]:
        """Enter the container's network, mount, UTS and IPC namespaces and its root, in ``cwd``.

        ``nsenter --wd=DIR`` would resolve DIR on the host (a working directory outside the
        container's root breaks e.g. MKL inside torch), so ``-w`` takes the container's own
        working directory (/) and a shell inside changes to ``cwd`` before it execs.
        """
        enter = ["nsenter", "-t", str(self.cpid), "-n", "-m", "-u", "-i", "-r", "-w"]
        return enter if cwd == "/" else [*enter, "sh", "-c", 'cd -- "$0" && exec "$@"', cwd]

    def _popen(self, cmd: list[str], **params):
        """Every process of this node (the shell included) joins the container's cgroups."""
        if self._starting_shell:  # Mininet's `mnexec -cdn bash ...`: attach to the container instead
            cmd = ["mnexec", "-cd", *self._nsenter(), *cmd[2:]]
        outer = params.pop("preexec_fn", None)

        def preexec() -> None:
            self._join()
            if outer is not None:
                outer()

        return Host._popen(self, cmd, preexec_fn=preexec, **params)

    def popen(self, *args, **kwargs):
        """``Host.popen`` inside the container; a working directory the container lacks becomes /."""
        cwd = str(kwargs.pop("cwd", None) or os.getcwd())
        if not self._in_container(cwd):
            cwd = "/"
        kwargs.setdefault("mncmd", ["mnexec", "-d", *self._nsenter(cwd)])
        return Host.popen(self, *args, **kwargs)

    # --- teardown -----------------------------------------------------------------------

    def terminate(self) -> None:
        """Stop the shell, save the container's log (when a results dir is set), remove it."""
        try:
            Host.terminate(self)
        finally:
            if self.results_dir is not None:
                with contextlib.suppress(Exception):
                    self.save_logs(self.results_dir)
            de.remove_container(self.container)

    def save_logs(self, directory: str | Path) -> Path:
        """Container log plus its inspect record (limits, mounts, state) into ``directory``."""
        path = de.save_logs(self.container, directory)
        with contextlib.suppress(Exception):
            self.container.reload()
            Path(directory, f"{self.container.name}.inspect.json").write_text(
                json.dumps(self.container.attrs, indent=1, default=str))
        return path


def save_logs(container: Any, directory: str | Path) -> Path:
    """Module-level form: ``save_logs(container, dir)``."""
    return de.save_logs(container, directory)
