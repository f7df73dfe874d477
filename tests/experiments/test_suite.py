"""Suite files: the shipped suites load and expand; bad input gives one line naming file and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.experiments.points import build_topology, expand
from testbed.spec.errors import SpecError
from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
SUITES = sorted((REPO / "experiments").glob("*.yaml"))


def test_shipped_suites_exist():
    names = {p.stem for p in SUITES}
    assert {"quick", "split-inference", "kv-cache", "trace-replay", "multi-device"} <= names


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_shipped_suite_loads_and_expands(path):
    suite = load_suite(path)
    points = expand(suite, 30)
    assert points
    kinds = {p.kind for p in points}
    if suite.workload.kind == "inference":  # a training suite compares its placements only
        assert {"on-device", "edge-offload", "cloud-offload", "split"} <= kinds  # baselines always present
    for p in points:
        topo = build_topology(suite, p)
        assert suite.roles["device"] in topo.nodes


def write_suite(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((REPO / "experiments/quick.yaml").read_text())
    data["topology"] = str(REPO / "topologies/device-edge-cloud.yaml")
    data["workload"]["prompts"] = str(REPO / "experiments/prompts/short.yaml")
    for key, value in changes.items():
        target = data
        parts = key.split("__")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(parts[-1], None)
        else:
            target[parts[-1]] = value
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


BAD = [
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"sweep__uplink_mbit": [2, -5]}, "sweep.uplink_mbit[1]", "must be > 0 (got -5)"),
    ({"sweep__warp": [1]}, "sweep.warp[0]", "unknown parameter 'warp'"),
    ({"sweep__mode": "zip", "sweep__delay_ms": [1]}, "sweep", "equal length"),
    ({"params__codec": "zstd"}, "params.codec", "must be one of"),
    ({"sweep__cut": [2]}, "sweep.cut", "also set in params"),
    ({"params__kv_cache": "yes"}, "params.kv_cache", "true or false"),
    ({"params__prompt": "nope"}, "params.prompt", "unknown prompt id 'nope'"),
    ({"placements__split": "watch=0:{cut},mec={cut}:{layers}"}, "placements.split", "no node 'watch'"),
    ({"placements__split": "phone=0:{cutt},mec={cut}:{layers}"}, "placements.split", "unknown variable"),
    ({"params__cut": None}, "placements", "uses {cut}"),
    ({"baselines": ["on-device", "fog"]}, "baselines[1]", "must be one of"),
    ({"repeats": 0}, "repeats", "integer >= 1 (got 0)"),
    ({"workload__max_new_tokens": "many"}, "workload.max_new_tokens", "integer >= 1"),
    ({"workload__prompts": "missing.yaml"}, "workload.prompts", "missing.yaml: file not found"),
    ({"sweep__trace": ["no-such-trace"]}, "sweep.trace[0]", "no such trace file"),
    (
        {"sweep__links.phone-cloud.up.bw_mbit": [5]},
        "sweep.links.phone-cloud.up.bw_mbit[0]",
        "no link between",
    ),
    ({"shaper": "magic"}, "shaper", "must be one of"),
    ({"energy__compute_w": -1}, "energy.compute_w", "must be >= 0"),
    ({"analytic__band": [2, 1]}, "analytic.band", "0 < low < high"),
    ({"roles__device": "ghost"}, "roles.device", "no node 'ghost'"),
    # a NUL byte in a path would reach the file system (ValueError): one line instead
    ({"workload__prompts": "a\0b.yaml"}, "workload.prompts", "without NUL bytes"),
    ({"topology": "t\0.yaml"}, "topology", "without NUL bytes"),
    ({"model": "m\0"}, "model", "without NUL bytes"),
    ({"sweep__trace": ["x\0y"]}, "sweep.trace[0]", "without NUL bytes"),
    ({"params__events": "e\0.yaml"}, "params.events", "without NUL bytes"),
]


@pytest.mark.parametrize(("changes", "field", "message"), BAD, ids=[b[1] for b in BAD])
def test_bad_suite_one_line_error(tmp_path, changes, field, message):
    path = write_suite(tmp_path, **changes)
    with pytest.raises(SpecError) as exc:
        load_suite(path)
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {field}: "), text
    assert message in text


def test_bad_topology_value_is_reported_at_load(tmp_path):
    # each value is checked at load (tests/spec); a rule between fields (jitter <= delay) when built
    path = write_suite(tmp_path, **{"params__links.phone-mec.up.jitter_ms": 99})
    suite = load_suite(path)
    with pytest.raises(SpecError) as exc:
        build_topology(suite, expand(suite, 30)[1])
    assert "device-edge-cloud.yaml: links[0].up.jitter_ms" in str(exc.value)


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nworkload: [unclosed\n")
    with pytest.raises(SpecError, match=r"s.yaml: yaml: syntax error at line \d+"):
        load_suite(path)


def test_set_overrides(tmp_path):
    path = write_suite(tmp_path)
    suite = load_suite(
        path, ["model=tiny", "sweep.uplink_mbit=[1, 3, 9]", "params.links.mec-cloud.up.delay_ms=0"]
    )
    assert suite.model == "tiny"
    assert suite.sweep["uplink_mbit"] == [1.0, 3.0, 9.0]
    assert suite.params["links.mec-cloud.up.delay_ms"] == 0
    with pytest.raises(SpecError, match="--set: must be KEY=VALUE"):
        load_suite(path, ["model"])


def test_cli_bad_suite_exits_2_with_one_line(tmp_path):
    path = write_suite(tmp_path, **{"sweep__uplink_mbit": [0]})
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", "run", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: sweep.uplink_mbit[0]: must be > 0"), proc.stderr
    assert not (tmp_path / "o" / "results.jsonl").exists()
