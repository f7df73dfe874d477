"""A block node: serve a block folder (the repository's catalogue, or an edge's store) over ZeroMQ.

    python nodes/block_node.py --settings '{"bind": "tcp://IP:PORT", "blocks": DIR}'

The settings are ``testbed.apps.caching.settings.BlockNodeSettings`` (checked on arrival: a bad one
is one line on stderr and exit code 2).  Prints ``READY ...`` once the socket is bound; on
SIGTERM/SIGINT prints its counters as one JSON line and exits.  Started by ``testbed.apps.launch``.
"""

from __future__ import annotations

from testbed.apps.caching.settings import BlockNodeSettings
from testbed.apps.launch import exit_now, read_settings


def main(argv: list[str] | None = None) -> int:
    settings = read_settings(BlockNodeSettings, argv, prog="block_node")
    from testbed.apps.caching.programs import block_node

    return block_node(settings)


if __name__ == "__main__":
    exit_now(main())
