"""The training device: the first layers and the data; drives every step, prints one JSON line.

    python nodes/train_client.py --settings '{"model": DIR, "end": E, "next": "tcp://IP:PORT", ...}'

The settings are ``testbed.apps.training.settings.ClientSettings`` (checked on arrival: a bad one is
one line on stderr and exit code 2).  Prints ``READY ...`` once the next stage answered, then the
measurements as one JSON line.  Started by ``testbed.apps.launch``.
"""

from __future__ import annotations

from testbed.apps.launch import exit_now, read_settings
from testbed.apps.training.settings import ClientSettings


def main(argv: list[str] | None = None) -> int:
    settings = read_settings(ClientSettings, argv, prog="train_client")
    from testbed.apps.training.programs import client_node  # torch loads only for good settings

    return client_node(settings)


if __name__ == "__main__":
    exit_now(main())
