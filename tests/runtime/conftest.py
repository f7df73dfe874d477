"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest

from testbed.runtime import docker_engine as de


@pytest.fixture(scope="session")
def client():
    """A Docker SDK client; the docker tests skip (with the reason) where no engine runs."""
    try:
        return de.engine()
    except de.DockerUnavailable as e:
        pytest.skip(str(e))
