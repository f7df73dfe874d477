"""The device program: tokenize, run the device's layers, drive split generation, print one JSON line.

    python nodes/driver.py --settings '{"model": DIR, "start": 0, "end": E, "next": "tcp://IP:PORT", ...}'

The settings are ``testbed.apps.inference.settings.DriverSettings`` (checked on arrival: a bad one is
one line on stderr and exit code 2).  Prints ``READY ...`` once the next hop answered, then the
measurements as one JSON line.  Started by ``testbed.apps.launch``.
"""

from __future__ import annotations

from testbed.apps.inference.settings import DriverSettings
from testbed.apps.launch import exit_now, read_settings


def main(argv: list[str] | None = None) -> int:
    settings = read_settings(DriverSettings, argv, prog="driver")
    from testbed.apps.inference.programs import driver  # torch loads only for good settings

    return driver(settings)


if __name__ == "__main__":
    exit_now(main())
