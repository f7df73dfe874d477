"""Checkpoints and ``--resume``: atomic files, the latest step every program saved, and a run killed
with SIGKILL that, resumed, ends with exactly the weights of an uninterrupted run (fp32)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from testbed.apps.training import checkpoint
from testbed.apps.training.run import TrainOptions, run_training
from testbed.spec.errors import SpecError
from tests.patience import patient

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
PLACEMENT = "phone=0:2,mec=2:4"


def _opt(steps: int, every: int = 2, **kw) -> TrainOptions:
    return TrainOptions(steps=steps, batch=4, seq=8, lr=2e-2, seed=1, evaluate=False, checkpoint_every=every,
                        data=[str(REPO / "testbed" / "model" / "data" / "eval_text.txt")], **kw)


def _adapters(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapters" / "adapter_model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3  # really trained


def test_files_are_atomic_and_the_common_step_is_the_latest_all_saved(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        checkpoint.save(tmp_path, "client0", step, {"adapters": torch.full((3,), float(step))})
    checkpoint.save(tmp_path, "stage1", 4, {"adapters": torch.zeros(3)})
    checkpoint.save(tmp_path, "stage1", 6, {"adapters": torch.zeros(3)})
    assert checkpoint.saved_steps(tmp_path) == {"client0": [4, 6, 8], "stage1": [4, 6]}  # the last KEEP
    assert checkpoint.common_step(tmp_path, ["client0", "stage1"]) == 6
    assert checkpoint.common_step(tmp_path, ["client0", "stage2"]) == 0
    assert float(checkpoint.load(tmp_path, "client0", 8)["adapters"][0]) == 8.0
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_local_resume_equals_the_uninterrupted_run(tiny4: Path, tmp_path: Path) -> None:
    whole = run_training(None, PLACEMENT, _opt(6), model=tiny4, local=True, out=tmp_path / "whole")
    cut = tmp_path / "cut"
    run_training(None, PLACEMENT, _opt(6), model=tiny4, local=True, out=cut)
    for step in (4, 6):  # as if the run had died after its checkpoint of step 2
        checkpoint.path(cut / "checkpoints", "local", step).unlink()
    again = run_training(None, PLACEMENT, _opt(6), model=tiny4, local=True, out=cut, resume=True)
    assert again["resumed_from_step"] == 2
    assert again["losses"] == whole["losses"]
    _assert_same(_adapters(cut), _adapters(tmp_path / "whole"))
    with pytest.raises(SpecError, match="options differ from the checkpointed run's .got lr"):
        run_training(None, PLACEMENT, TrainOptions(**{**_opt(6).__dict__, "lr": 1e-2}), model=tiny4,
                     local=True, out=cut, resume=True)


def _our_nodes(marker: str) -> list[int]:
    """Processes whose command line names this test's own folder (the node programs it started)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d))
            except OSError:
                continue
    return pids


def test_split_run_killed_then_resumed_ends_with_the_same_weights(tiny4: Path, tmp_path: Path) -> None:
    steps = 16
    whole = run_training(None, PLACEMENT, _opt(steps), model=tiny4, loopback=True, out=tmp_path / "whole")
    out = tmp_path / "killed"
    ckpt = out / "checkpoints"
    argv = [sys.executable, "-m", "testbed", "train", str(TOPO), "--model", str(tiny4), "--placement",
            PLACEMENT, "--loopback", "--steps", str(steps), "--batch", "4", "--seq", "8", "--lr", "2e-2",
            "--seed", "1", "--no-eval", "--checkpoint-every", "2", "--out", str(out),
            "--data", str(REPO / "testbed" / "model" / "data" / "eval_text.txt")]
    driver = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + patient(120)
        while checkpoint.common_step(ckpt, ["client0", "stage1"]) < 4:
            assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint of step 4"
            time.sleep(0.01)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (out / "result.json").exists()  # killed mid-run
    deadline = time.monotonic() + patient(20)  # the orphaned node programs notice and stop
    while _our_nodes(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _our_nodes(str(out))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "node programs outlived their driver"

    again = run_training(None, PLACEMENT, _opt(steps), model=tiny4, loopback=True, out=out, resume=True)
    assert 4 <= again["resumed_from_step"] < steps
    assert again["losses"] == whole["losses"]
    assert len(again["step_ms"]) == steps
    _assert_same(_adapters(out), _adapters(tmp_path / "whole"))
