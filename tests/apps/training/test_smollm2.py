"""SmolLM2-135M: split training with fp32 on the wire equals the one-process reference."""

from __future__ import annotations

import pytest

from testbed.apps.training.local import run_local, train_batches
from testbed.apps.training.lora import LoraSpec
from testbed.model.loading import default_model_dir
from tests.apps.training.threads import split_run

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_smollm2_split_equals_local() -> None:
    model = default_model_dir()
    batches = train_batches(model, [], steps=2, batch=2, seq=16, seed=0)
    ref, ref_adapters = run_local(model, 30, batches, LoraSpec(), 1e-3, 0, 2)
    out, adapters = split_run(model, [4], 30, batches, micro_batches=2, schedule="1f1b", lr=1e-3, seed=0)
    assert out["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert 0.5 < ref["losses"][0] < 8  # a trained model on English text, not a random one
    assert sorted(adapters) == sorted(ref_adapters) and len(adapters) == 30 * len(LoraSpec().targets) * 2
    for name, t in ref_adapters.items():
        assert float((adapters[name] - t).abs().max()) <= 1e-6 * float(t.abs().max()), name
