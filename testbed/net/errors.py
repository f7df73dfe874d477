"""The error a running network raises when one of its parts fails (a link process dies, trace
replay stops): it names the link, so the user knows which part of the topology broke."""

from __future__ import annotations

from testbed.spec.errors import TestbedError


class NetworkError(TestbedError, RuntimeError):
    """A part of a running emulated network failed; the run cannot go on."""
