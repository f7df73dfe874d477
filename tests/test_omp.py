"""The OpenMP wait policy: chosen from TESTBED_OMP, set before torch loads, passed on to node processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed import omp
from testbed.runtime.inference import node_env


@pytest.mark.parametrize(
    ("env", "added", "shown"),
    [
        ({}, {"OMP_WAIT_POLICY": "PASSIVE"}, "passive"),
        ({"TESTBED_OMP": "spin"}, {"GOMP_SPINCOUNT": "10000"}, "spin"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {}, "OMP_WAIT_POLICY=ACTIVE"),  # the user's own setting wins
        ({"TESTBED_OMP": "spin", "GOMP_SPINCOUNT": "5"}, {}, "GOMP_SPINCOUNT=5"),
    ],
)
def test_policy_variables(env, added, shown) -> None:
    got = omp.omp_env(env)
    assert {k: v for k, v in got.items() if k != omp.ENV_VAR} == added
    assert omp.describe({**env, **got}) == shown


def test_unknown_policy_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match=r"TESTBED_OMP='busy': choose one of passive, spin"):
        omp.omp_env({"TESTBED_OMP": "busy"})


@pytest.mark.parametrize("policy", ["passive", "spin"])
def test_a_fresh_process_and_its_nodes_get_the_policy(policy, monkeypatch) -> None:
    env = {k: v for k, v in node_env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["TESTBED_OMP"] = policy
    code = ("import os, testbed, torch, testbed.omp as o; print(json.dumps([o.in_effect(), "
            "os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], env=env, capture_output=True,
                         text=True, check=True)
    effect, wait, spin = json.loads(out.stdout)
    assert effect == policy
    assert (wait, spin) == (("PASSIVE", None) if policy == "passive" else (None, "10000"))
    # shard nodes started from a process with this policy inherit it
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("TESTBED_OMP", policy)
    assert omp.describe(node_env()) == policy
