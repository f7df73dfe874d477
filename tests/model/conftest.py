"""A tiny LLaMA checkpoint built from code, shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.model.tiny import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "ckpt", n_layers=4, hidden=64, seed=0)
