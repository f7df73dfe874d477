"""An edge agent of an emulated cache run: evict, fetch (from the repository or a neighbouring edge) and
store blocks as the driver tells it, one JSON line per step on stdin.

    python nodes/cache_edge.py --settings '{"store": DIR, "scratch": DIR, "capacity_bytes": N, ...}'

The settings are ``testbed.apps.caching.edge_agent.EdgeAgentSettings`` (a bad one is one line on stderr
and exit code 2).  Prints ``READY ...`` once its fetchers exist; started by
``testbed.apps.caching.emulated`` inside the edge's network namespace.
"""

from __future__ import annotations

from testbed.apps.caching.edge_agent import EdgeAgentSettings
from testbed.apps.launch import exit_now, read_settings


def main(argv: list[str] | None = None) -> int:
    settings = read_settings(EdgeAgentSettings, argv, prog="cache_edge")
    from testbed.apps.caching.edge_agent import edge_agent

    return edge_agent(settings)


if __name__ == "__main__":
    exit_now(main())
