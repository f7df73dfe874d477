"""A fully frozen device (``--freeze-client 1``) uploads each sample's activations once; the edge
reuses them afterwards, the training equals ``--local`` and the record counts the bytes saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from testbed.apps.training.local import client_data, take_sample_ids
from testbed.apps.training.run import TrainOptions, run_training

TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. "
        "Rain falls softly on the old roof, and the river runs on toward the distant sea. ")


def test_frozen_device_reuses_its_smashed_data_and_equals_local(tiny4: Path, tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    opt = TrainOptions(steps=8, batch=4, seq=8, lr=2e-2, seed=1, evaluate=False, data=[str(data)],
                       freeze_client=1.0, micro_batches=2)
    split = run_training(None, "phone=0:2,mec=2:4", opt, model=tiny4, loopback=True, out=tmp_path / "split")
    local = run_training(None, "phone=0:2,mec=2:4", opt, model=tiny4, local=True, out=tmp_path / "local")
    assert split["losses"] == pytest.approx(local["losses"], rel=1e-6)
    a = load_file(str(tmp_path / "split" / "adapters" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "local" / "adapters" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(int(k.split(".")[4]) >= 2 for k in a)  # nothing on the device
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9), k

    (cd,) = client_data(tiny4, [str(data)], 1, 4, 8)
    seen: set[int] = set()
    reused = 0
    for ids in take_sample_ids(cd.train, 8, 4, 8, 1):
        for half in (ids[:2], ids[2:]):
            if all(i in seen for i in half):
                reused += len(half)
            seen.update(half)
    assert reused > 8  # several epochs of a short text
    assert split["smashed_reused_samples"] == reused
    assert split["smashed_bytes_saved"] > 0
    assert split["bytes_up"][-1] < split["bytes_up"][0] / 2  # ids and labels instead of activations
