"""The Docker engine as the docker runtime sees it: a checked client, labels, cgroups, cleanup.

All talk to dockerd goes through the Docker SDK for Python (never parsing ``docker`` CLI
output).  Every image and container the testbed makes carries the label
``edgellm-testbed=1``; containers also carry ``edgellm-testbed.run=<run id>`` and
``edgellm-testbed.node=<node name>`` so ``testbed clean`` can find leftovers of killed runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from testbed.hosts import cgroups
from testbed.spec.errors import SpecError

LABEL = "edgellm-testbed"
RUN_LABEL = "edgellm-testbed.run"
NODE_LABEL = "edgellm-testbed.node"
HASH_LABEL = "edgellm-testbed.inputs"
API_TIMEOUT_S = 60


class DockerUnavailable(SpecError):
    """``runtime: docker`` was asked for but no Docker engine answers."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


def engine(source: str | Path = "<runtime>", field: str = "runtime") -> Any:
    """A connected ``docker.DockerClient``; raises :class:`DockerUnavailable` (one line) if none.

    ``source``/``field`` name what asked for docker, e.g. the topology file and
    ``nodes.phone.runtime``, so the error reads like any other spec error.
    """
    try:
        import docker
    except ImportError as e:  # pragma: no cover - docker is a declared dependency
        raise DockerUnavailable(source, field, f"docker runtime needs the 'docker' package ({e})") from e
    try:
        client = docker.from_env(timeout=API_TIMEOUT_S)
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure means "no engine"
        raise DockerUnavailable(
            source,
            field,
            f"docker runtime needs a running Docker engine ({_first_line(e)}); "
            "start dockerd (bash vagrant/provision.sh) or use --runtime process",
        ) from e
    return client


def container_pid(container: Any) -> int:
    """Host PID of the container's init process (0 when it is not running)."""
    container.reload()
    return int(container.attrs["State"]["Pid"])


def cgroup_procs_files(pid: int) -> list[Path]:
    """The ``cgroup.procs`` files of every cgroup (v1 hierarchies and/or v2) of process ``pid``.

    Writing a PID into all of them puts a process into the same cgroups as ``pid``, which is
    what ``docker exec`` does; the container's CPU and memory limits then apply to it.
    """
    v1, v2 = cgroups.mounts()
    files: list[Path] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        if controllers:
            wanted = set(controllers.split(","))
            base = next((m for opts, m in v1.items() if wanted <= opts), None)
        else:
            base = v2
        if base is not None:
            f = base / path.lstrip("/") / "cgroup.procs"
            if f.exists():
                files.append(f)
    return files


def join_cgroups(files: list[Path]) -> None:
    """Move the calling process into the cgroups whose ``cgroup.procs`` files are given.

    Safe in a ``preexec_fn``: plain ``os`` calls, no locks.
    """
    me = str(os.getpid()).encode()
    for f in files:
        fd = os.open(f, os.O_WRONLY)
        try:
            os.write(fd, me)
        finally:
            os.close(fd)


def cgroup_pids(files: list[Path]) -> set[int]:
    """All PIDs in the given cgroups (missing cgroups count as empty)."""
    pids: set[int] = set()
    for f in files:
        try:
            pids.update(int(p) for p in f.read_text().split())
        except OSError:
            continue
    return pids


def kill_cgroup(files: list[Path]) -> int:
    """SIGKILL every process in the given cgroups; returns how many were signalled."""
    n = 0
    for pid in cgroup_pids(files):
        try:
            os.kill(pid, signal.SIGKILL)
            n += 1
        except ProcessLookupError:
            pass
    return n


def remove_container(container: Any) -> None:
    """Kill everything in the container's cgroups (also processes we attached from outside its
    PID namespace, which ``docker rm -f`` alone would leave behind), then remove it."""
    try:
        pid = container_pid(container)
    except Exception:  # noqa: BLE001 - already gone
        return
    if pid > 0:
        try:
            kill_cgroup(cgroup_procs_files(pid))
        except OSError:
            pass
    try:
        container.remove(force=True)
    except Exception as e:  # noqa: BLE001
        if getattr(e, "status_code", None) != 404:
            raise
    run_id = (container.labels or {}).get(RUN_LABEL)
    if run_id:
        remove_run_cgroup_dirs(run_id)


def remove_run_cgroup_dirs(run_id: str) -> list[Path]:
    """Remove the (empty) ``testbed/<run id>`` cgroup parents docker made in every hierarchy."""
    v1, v2 = cgroups.mounts()
    removed = []
    for base in [*v1.values(), *([v2] if v2 else [])]:
        d = base / "testbed" / run_id
        try:
            d.rmdir()
            removed.append(d)
        except OSError:  # absent, or still in use (another node of the run, a process host)
            continue
    return removed


def remove_labelled(client: Any | None = None, run_id: str | None = None) -> list[str]:
    """Remove the testbed's containers (all, or one run's); returns their names.

    For ``testbed clean``: works after a SIGKILLed run because it looks only at labels.
    """
    client = client or engine()
    label = LABEL if run_id is None else f"{RUN_LABEL}={run_id}"
    removed = []
    for c in client.containers.list(all=True, filters={"label": label}):
        remove_container(c)
        removed.append(c.name)
    return removed


def save_logs(container: Any, directory: str | Path) -> Path:
    """Write the container's stdout/stderr log to ``DIR/<container name>.log``; returns the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{container.name}.log"
    out.write_bytes(container.logs(stdout=True, stderr=True, timestamps=True))
    return out
