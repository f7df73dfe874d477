"""Which Mininet host class runs a node: ``host_class(node, runtime_override)``."""

from __future__ import annotations

from testbed.hosts.limits import resolve_limits
from testbed.hosts.process_host import ProcessHost
from testbed.spec.topology import NodeSpec


def host_class(node: NodeSpec, runtime_override: str | None = None) -> tuple[type, dict]:
    """The host class for ``node`` and the keyword parameters it takes (besides ``run_id``).

    ``runtime_override`` (the ``--runtime`` flag) wins over the node's own ``runtime``.
    """
    runtime = runtime_override or node.runtime
    lim = resolve_limits(node)  # the same limits (role defaults included) in both runtimes
    if runtime == "process":
        return ProcessHost, {"cpu": lim.cpu, "memory_mb": lim.memory_mb}
    if runtime == "docker":
        from testbed.hosts.docker_host import DockerHost

        return DockerHost, {"cpu": lim.cpu, "memory_mb": lim.memory_mb}
    raise NotImplementedError(f"runtime {runtime!r} is not available yet (node {node.name})")
