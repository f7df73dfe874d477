"""Shared test configuration: root-only tests are skipped (with a reason) when not root."""

from __future__ import annotations

import os
import signal

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts background jobs with SIGINT ignored, and children inherit that: the Ctrl-C
    # tests (here and in the programs they start) need Python's own handler, whoever started pytest.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "guest: also run in the test guest (make test-guest)")
    config.addinivalue_line("markers", "guest_slow: not in make test-guest's default set: its node "
                            "programs import torch, minutes under TCG (TESTBED_GUEST_MARK selects it)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (network namespaces, tc)")
        for item in items:
            if "root" in item.keywords or "netem" in item.keywords:
                item.add_marker(skip)
        return
    if any("netem" in item.keywords for item in items):
        from testbed.net.capabilities import probe

        if not probe().netem:
            skip = pytest.mark.skip(reason="no sch_netem in this kernel (runs in the guest: make test-guest)")
            for item in items:
                if "netem" in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(scope="session")
def client():
    """A Docker SDK client; the docker tests skip (with the reason) where no engine runs."""
    from testbed.hosts import docker_engine as de

    try:
        return de.engine()
    except de.DockerUnavailable as e:
        pytest.skip(str(e))
