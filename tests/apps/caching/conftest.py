"""A small catalogue of the tiny model (built once per session) for the caching tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.caching.catalogue import Catalogue, build_catalogue

ADAPTERS = 6
PARTIAL = 2


@pytest.fixture(scope="session")
def tiny_catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    out = tmp_path_factory.mktemp("cat") / "catalogue"
    return build_catalogue(out, ADAPTERS, PARTIAL, base="tiny", seed=3)


@pytest.fixture(scope="session")
def cells3() -> Path:
    return Path(__file__).resolve().parents[3] / "topologies" / "cells-3.yaml"
