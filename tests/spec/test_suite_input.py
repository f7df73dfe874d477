"""Suite files and ``--set`` overrides go through the same loader and checks as topologies.

Each bad input is one line ``FILE: field: problem (got value)`` naming the file at fault (the suite,
its topology, its prompt set, or ``--set``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.spec import check
from testbed.spec.errors import SpecError
from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
TOPO = REPO / "topologies/device-edge-cloud.yaml"
PROMPTS = REPO / "experiments/prompts/short.yaml"
CORES = check.machine_cores()

SUITE = """name: s
topology: {topo}
workload:
  prompts: {prompts}
  max_new_tokens: 8
placements:
  split: "phone=0:{{cut}},mec={{cut}}:{{layers}}"
params: {{cut: 4}}
{extra}
"""


def write(tmp_path: Path, extra: str = "", topo: Path = TOPO, prompts: Path = PROMPTS) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.format(topo=topo, prompts=prompts, extra=extra))
    return path


def error(path: Path, sets: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as e:
        load_suite(path, sets)
    text = str(e.value)
    assert "\n" not in text and e.value.exit_code == 2
    return text


def test_the_template_loads(tmp_path: Path) -> None:
    suite = load_suite(write(tmp_path, "sweep: {uplink_mbit: [1.0e1, 2e1]}\nrepeats: 1e1"))
    assert suite.sweep["uplink_mbit"] == [10.0, 20.0]  # YAML 1.2 exponents are numbers
    assert suite.repeats == 10 and isinstance(suite.repeats, int)
    assert suite.device_nodes == ["phone"]


def test_sweep_that_is_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, "sweep: [1, 2]")
    assert error(path) == f"{path}: sweep: must be a mapping of parameter -> list of values (got [1, 2])"


def test_more_devices_than_the_topology_has(tmp_path: Path) -> None:
    path = write(tmp_path).with_name("suite.yaml")
    path.write_text(path.read_text().replace("max_new_tokens: 8", "max_new_tokens: 8\n  devices: 3"))
    assert error(path) == (f"{path}: workload.devices: must be <= 1, the device nodes of "
                           "device-edge-cloud.yaml (phone) (got 3)")
    path = tmp_path / "cell.yaml"
    path.write_text(f"topology: {REPO / 'topologies/cell-4.yaml'}\nworkload: {{prompts: {PROMPTS}}}\n"
                    "sweep: {devices: [1, 4, 5]}\n")
    assert error(path) == (f"{path}: sweep.devices[2]: must be <= 4, the device nodes of cell-4.yaml "
                           "(dev1, dev2, dev3, dev4) (got 5)")


def test_duplicate_key_in_the_suite(tmp_path: Path) -> None:
    path = write(tmp_path, "repeats: 1\nshaper: auto\nrepeats: 3")
    assert error(path) == f"{path}: yaml: line 11, column 1: duplicate key 'repeats' (first on line 9)"


def test_duplicate_key_in_the_topology_is_the_topology_error(tmp_path: Path) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text(TOPO.read_text().replace("  mec:   {role: edge}\n",
                                             "  mec:   {role: edge}\n  mec:   {role: cloud}\n"))
    path = write(tmp_path, topo=topo)
    assert error(path) == f"{topo}: yaml: line 8, column 3: duplicate key 'mec' (first on line 7)"


def test_duplicate_key_in_the_prompt_set(tmp_path: Path) -> None:
    prompts = tmp_path / "p.yaml"
    prompts.write_text("prompts:\n  - {id: a, text: hello, id: b}\n")
    path = write(tmp_path, prompts=prompts)
    assert error(path) == f"{prompts}: yaml: line 2, column 26: duplicate key 'id' (first on line 2)"


@pytest.mark.parametrize(("extra", "field", "message"), [
    ("sweep: {uplink_mbit: [1e12]}", "sweep.uplink_mbit[0]",
     "must be <= 100000 (100 Gbit/s) (got 1000000000000.0)"),
    ("sweep: {uplink_mbit: ['1.0e9']}", "sweep.uplink_mbit[0]", "must be a finite number (got '1.0e9')"),
    ("sweep: {delay_ms: [1e12]}", "sweep.delay_ms[0]", "must be <= 10000 (10 s) (got 1000000000000.0)"),
    ("sweep: {device_cpu: [0.5, 1e9]}", "sweep.device_cpu[1]",
     f"must be <= {CORES} (the {CORES} cores of this machine) (got 1000000000.0)"),
    ("sweep: {loss_pct: [101]}", "sweep.loss_pct[0]", "must be <= 100 (got 101)"),
    ("repeats: 1e6", "repeats", "must be an integer <= 1000 (got 1000000.0)"),
    ("sweep: {max_new_tokens: [100000]}", "sweep.max_new_tokens[0]",
     "must be an integer <= 4096 (half the model's 8192-token context) (got 100000)"),
    ("sweep: {cut: [2]}", "sweep.cut", "also set in params: set it in one place"),
    ("params: {cut: 4, links.phone-mec.up.bw_mbit: 1e12}", "params.links.phone-mec.up.bw_mbit",
     "must be <= 100000 (100 Gbit/s) (got 1000000000000.0)"),
    ("params: {cut: 4, nodes.phone.cpu: 1e9}", "params.nodes.phone.cpu",
     f"must be <= {CORES} (the {CORES} cores of this machine) (got 1000000000.0)"),
    ("params: {cut: 4, nodes.phone.runtime: vm}", "params.nodes.phone.runtime",
     "must be one of process, docker (got 'vm')"),
    ("energy: {compute_w: .nan}", "energy.compute_w", "must be a finite number (got nan)"),
    ("analytic: {band: [0.5, .inf]}", "analytic.band[1]", "must be a finite number (got inf)"),
    ("sweep: {mode: diagonal}", "sweep.mode", "must be one of cartesian, zip (got 'diagonal')"),
    ("roles: cell", "roles", "must be a mapping of device/edge/cloud to node names (got 'cell')"),
    ("roles: {fog: mec}", "roles.fog", "unknown key 'fog' (expected one of device, edge, cloud)"),
    ("roles: {edge: ghost}", "roles.edge", f"no node 'ghost' in {TOPO}"),
])
def test_bad_suite_values(tmp_path: Path, extra: str, field: str, message: str) -> None:
    # the template has a params mapping; an extra one replaces it (a duplicate key otherwise)
    path = write(tmp_path, extra)
    if extra.startswith("params:"):
        path.write_text(path.read_text().replace("params: {cut: 4}\n", ""))
    assert error(path) == f"{path}: {field}: {message}"


def test_model_folder_with_only_config_is_refused_at_load(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = write(tmp_path, "model: m")
    assert error(path) == (f"{path}: model: {model}: not a checkpoint folder: no model.safetensors, "
                           "tokenizer.json (a checkpoint holds config.json, model.safetensors, "
                           "tokenizer.json)")


# -- --set overrides ------------------------------------------------------------------------------

def test_set_values_are_read_and_checked_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path)
    suite = load_suite(path, ["sweep.uplink_mbit=[1e1, 2.5e1]", "repeats=3", "workload.max_new_tokens=1e2"])
    assert suite.sweep["uplink_mbit"] == [10.0, 25.0] and suite.repeats == 3
    assert suite.workload.max_new_tokens == 100


@pytest.mark.parametrize(("sets", "expected"), [
    (["sweep.uplink_mbit=[1e12]"], "--set: sweep.uplink_mbit[0]: must be <= 100000 (100 Gbit/s) "
                                   "(got 1000000000000.0)"),
    (["workload.devices=2"], "--set: workload.devices: must be <= 1, the device nodes of "
                             "device-edge-cloud.yaml (phone) (got 2)"),
    (["sweep=[1, 2]"], "--set: sweep: must be a mapping of parameter -> list of values (got [1, 2])"),
    (["params={cut: 4, cut: 5}"], "--set: params: line 1, column 10: duplicate key 'cut' (first on line 1)"),
    (["repeats=[1"], "--set: repeats: syntax error at line 1, column 3: expected ',' or ']', but got "
                     "'<stream end>'"),
    (["repets=3"], "--set: repets: unknown key 'repets' (expected one of name, description, topology, "
                   "model, roles, workload, baselines, placements, params, sweep, repeats, shaper, "
                   "energy, analytic)"),
    (["device_cpu"], "SUITE: --set: must be KEY=VALUE, e.g. sweep.uplink_mbit=[2,20] (got 'device_cpu')"),
    (["sweep..cut=[1]"],
     "SUITE: --set: must be KEY=VALUE, e.g. sweep.uplink_mbit=[2,20] (got 'sweep..cut=[1]')"),
])
def test_bad_set_names_the_override(tmp_path: Path, sets: list[str], expected: str) -> None:
    path = write(tmp_path)
    assert error(path, sets) == expected.replace("SUITE", str(path))


def test_an_error_in_the_file_still_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "repeats: 0")
    assert error(path, ["sweep.uplink_mbit=[5]"]) == f"{path}: repeats: must be an integer >= 1 (got 0)"
