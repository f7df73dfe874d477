"""One shard node: serve layers START:END over ZeroMQ and relay to the next hop.

    python nodes/shard_node.py --settings '{"bind": "tcp://IP:PORT", "model": DIR, "start": S, "end": E, ...}'

The settings are ``testbed.apps.inference.settings.ShardSettings`` (checked on arrival: a bad one is
one line on stderr and exit code 2).  Prints ``READY ...`` once the shard is loaded and the socket
bound; exits cleanly on SIGTERM/SIGINT.  Started by ``testbed.apps.launch``.
"""

from __future__ import annotations

from testbed.apps.inference.settings import ShardSettings
from testbed.apps.launch import exit_now, read_settings


def main(argv: list[str] | None = None) -> int:
    settings = read_settings(ShardSettings, argv, prog="shard_node")
    from testbed.apps.inference.programs import shard_node  # torch loads only for good settings

    return shard_node(settings)


if __name__ == "__main__":
    exit_now(main())
