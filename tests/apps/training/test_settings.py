"""The node programs' settings: checked on arrival, one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.apps.launch import decode_settings, encode_settings
from testbed.apps.training.settings import ClientSettings, StageSettings
from testbed.spec.errors import SpecError


def _stage(model: Path, **over) -> str:
    d = dict(model=str(model), start=1, end=4, stage=1, stages=2, bind="tcp://127.0.0.1:5701")
    d.update(over)
    return json.dumps(d)


def test_good_settings_round_trip(tiny4: Path) -> None:
    s = decode_settings(StageSettings, _stage(tiny4, trainable=[2, 3], clients=3, aggregate_every=2))
    assert s.trainable == [2, 3] and s.clients == 3
    assert decode_settings(StageSettings, encode_settings(s)) == s
    c = ClientSettings(model=str(tiny4), start=0, end=1, next="tcp://127.0.0.1:5701", hops=["0:1", "1:4"],
                       batch=4, micro_batches=2)
    assert decode_settings(ClientSettings, encode_settings(c)) == c


@pytest.mark.parametrize(("over", "field", "problem"), [
    ({"bind": "tcp://0.0.0.0:5701"}, "bind", "must be tcp://IP:PORT of this host"),
    ({"also_bind": ["udp://x"]}, "also_bind", "must be tcp://IP:PORT of this host"),
    ({"stage": 0}, "stage", "a stage server is stage 1 or later"),
    ({"schedule": "zigzag"}, "schedule", "must be one of gpipe, 1f1b"),
    ({"grad_codec": "int4"}, "grad_codec", "must be one of fp32, fp16, bf16, int8"),
    ({"targets": ["q_proj", "1bad"]}, "targets", "must be a non-empty list of module names"),
    ({"lr": 3.0}, "lr", "must be in (0, 1)"),
    ({"trainable": [1, "2"]}, "trainable", "must be a list of an integer or null"),
    ({"end": 1}, "end", "must be greater than start (1)"),
])
def test_bad_stage_settings(tiny4: Path, over: dict, field: str, problem: str) -> None:
    with pytest.raises(SpecError) as e:
        decode_settings(StageSettings, _stage(tiny4, **over), "train_stage settings")
    assert f"train_stage settings: {field}: {problem}" in str(e.value)


def test_bad_client_settings(tiny4: Path) -> None:
    base = dict(model=str(tiny4), start=0, end=1, next="tcp://127.0.0.1:5701", hops=["0:1", "1:4"])
    for over, field in [({"batch": 3, "micro_batches": 2}, "micro_batches"), ({"hops": ["0:1"]}, "hops"),
                        ({"next": None}, "next"), ({"client": 2, "clients": 2}, "client")]:
        with pytest.raises(SpecError, match=f"^train_client settings: {field}: "):
            decode_settings(ClientSettings, json.dumps({**base, **over}), "train_client settings")
