"""One training stage server: layers START:END with LoRA adapters, forward and backward over ZeroMQ.

    python nodes/train_stage.py --settings '{"bind": "tcp://IP:PORT", "model": DIR, "start": S, ...}'

The settings are ``testbed.apps.training.settings.StageSettings`` (checked on arrival: a bad one is
one line on stderr and exit code 2).  Prints ``READY ...`` once loaded and bound; exits cleanly on
SIGTERM/SIGINT.  Started by ``testbed.apps.launch``.
"""

from __future__ import annotations

from testbed.apps.launch import exit_now, read_settings
from testbed.apps.training.settings import StageSettings


def main(argv: list[str] | None = None) -> int:
    settings = read_settings(StageSettings, argv, prog="train_stage")
    from testbed.apps.training.programs import stage_node  # torch loads only for good settings

    return stage_node(settings)


if __name__ == "__main__":
    exit_now(main())
