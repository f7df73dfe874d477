"""The OpenMP wait policy: chosen from TESTBED_OMP, set before torch loads, passed on to node processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testbed import omp
from testbed.apps.inference.run import node_env


@pytest.mark.parametrize(
    ("env", "role", "added", "shown"),
    [
        ({}, "local", {"GOMP_SPINCOUNT": "10000"}, "spin"),
        ({}, "node", {"OMP_WAIT_POLICY": "PASSIVE"}, "passive"),
        ({"TESTBED_OMP": "passive"}, "local", {"OMP_WAIT_POLICY": "PASSIVE"}, "passive"),
        ({"TESTBED_OMP": "spin"}, "node", {"GOMP_SPINCOUNT": "10000"}, "spin"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "node", {}, "OMP_WAIT_POLICY=ACTIVE"),  # the user's own wins
        ({"TESTBED_OMP": "spin", "GOMP_SPINCOUNT": "5"}, "local", {}, "GOMP_SPINCOUNT=5"),
    ],
)
def test_policy_variables(env, role, added, shown) -> None:
    got = omp.omp_env(env, role)
    assert got == added
    assert omp.describe({**env, **got}, role) == shown


def test_unknown_policy_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match=r"TESTBED_OMP='busy': choose one of passive, spin"):
        omp.omp_env({"TESTBED_OMP": "busy"})


CHILD = """
import json, os
import testbed, torch
from testbed import omp
from testbed.apps.inference.run import node_env
env = node_env()
print(json.dumps([omp.in_effect(), os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"),
                  env.get("OMP_WAIT_POLICY"), env.get("GOMP_SPINCOUNT"), omp.describe(env, "node")]))
"""


@pytest.mark.parametrize("policy", ["", "passive", "spin"])
def test_a_fresh_process_and_its_nodes_get_their_policies(policy) -> None:
    """A fresh process sets libgomp's variables before torch loads; the node environment it builds
    carries the nodes' policy, not its own."""
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TESTBED_OMP")
    env = {k: v for k, v in node_env().items() if k not in drop}
    if policy:
        env["TESTBED_OMP"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    local, wait, spin, node_wait, node_spin, node = json.loads(out.stdout)
    want_local, want_node = (policy, policy) if policy else ("spin", "passive")
    assert local == want_local and node == want_node
    assert (wait, spin) == (("PASSIVE", None) if want_local == "passive" else (None, "10000"))
    assert (node_wait, node_spin) == (("PASSIVE", None) if want_node == "passive" else (None, "10000"))
