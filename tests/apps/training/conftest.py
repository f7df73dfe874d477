"""Fixtures of the training tests: a tiny model built from code."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.model.tiny import make_tiny_model_dir


@pytest.fixture(scope="package")
def tiny4(tmp_path_factory) -> Path:
    """A 4-layer tiny model, hidden size 64."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=4, hidden=64)
