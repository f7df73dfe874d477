"""GGUF -> checkpoint conversion is safe against concurrent callers (lock file + atomic rename)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

SCRIPT = "from testbed.model.loading import default_model_dir; print(default_model_dir())"


def test_two_concurrent_conversions(tmp_path) -> None:
    target = tmp_path / "cache" / "smollm2"
    env = {**os.environ, "TESTBED_CACHE": str(target)}
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    assert {o[0].strip() for o in outs} == {str(target)}
    # one finished checkpoint, no half-written temporary directories left beside it
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == ["smollm2"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "gguf_q4.safetensors"} <= {
        p.name for p in target.iterdir()
    }
