"""The one checker: number ranges, the strict YAML loader, the documented bounds and the model folder."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import yaml

from testbed.spec import check
from testbed.spec.check import Checker, Range, flag_choice, flag_number
from testbed.spec.checkpoint import CHECKPOINT_FILES, ModelFileError, check_model_path
from testbed.spec.errors import SpecError, TestbedError
from testbed.spec.topology import load_topology
from testbed.spec.yamlfile import load_yaml, parse_yaml

CORES = check.machine_cores()
MEMORY = check.machine_memory_mb()


@pytest.mark.parametrize(("rng", "value", "problem"), [
    (check.BW_MBIT, 0, "must be > 0"),
    (check.BW_MBIT, 1e12, "must be <= 100000 (100 Gbit/s)"),
    (check.BW_MBIT, "fast", "must be a finite number"),
    (check.BW_MBIT, math.nan, "must be a finite number"),
    (check.BW_MBIT, True, "must be a finite number"),
    (check.ANY_NUMBER, 10**400, "must be a finite number"),
    (check.REPEATS, 10**400, "must be a finite number"),
    (check.DELAY_MS, -1, "must be >= 0"),
    (check.DELAY_MS, 1e12, "must be <= 10000 (10 s)"),
    (check.LOSS_PCT, 100.5, "must be <= 100"),
    (check.QUEUE_PKTS, 2.5, "must be an integer >= 1"),
    (check.QUEUE_PKTS, 10**7, "must be an integer <= 100000 (150 MB of 1500-byte packets)"),
    (check.REPEATS, 0, "must be an integer >= 1"),
    (check.CPU, 1e9, f"must be <= {CORES} (the {CORES} cores of this machine)"),
    (check.MEMORY_MB, 10**9, f"must be an integer <= {MEMORY} (the {MEMORY} MiB of this machine)"),
])
def test_range_names_the_broken_rule(rng: Range, value, problem: str) -> None:
    assert rng.violation(value) == problem


@pytest.mark.parametrize(("rng", "value", "converted"), [
    (check.BW_MBIT, 10, 10.0), (check.BW_MBIT, 100_000, 100_000.0), (check.DELAY_MS, 0, 0.0),
    (check.REPEATS, 3, 3), (check.REPEATS, 1e3, 1000), (check.CPU, CORES, float(CORES)),
])
def test_range_accepts_and_types_good_values(rng: Range, value, converted) -> None:
    assert rng.violation(value) is None
    out = Checker("f.yaml").number(value, "x", rng)
    assert out == converted and type(out) is type(converted)


def test_checker_error_is_one_line_with_source_field_and_value() -> None:
    c = Checker("s.yaml")
    with pytest.raises(SpecError) as e:
        c.number(-3, "params.delay_ms", check.DELAY_MS)
    assert str(e.value) == "s.yaml: params.delay_ms: must be >= 0 (got -3)"
    assert e.value.exit_code == 2 and isinstance(e.value, TestbedError)
    with pytest.raises(SpecError, match=r"^s.yaml: a.b: unknown key 'b' \(expected one of c, d\)$"):
        c.mapping({"b": 1}, "a", ("c", "d"))
    with pytest.raises(SpecError, match=r"^s.yaml: \(top level\): must be a mapping \(got \[1\]\)$"):
        c.mapping([1], "")
    with pytest.raises(SpecError, match=r"^s.yaml: quant: must be one of none, int8 \(got 'int3'\)$"):
        c.choice("int3", "quant", ("none", "int8"))


@pytest.mark.parametrize(("rng", "text", "message"), [
    (check.MAX_NEW_TOKENS, "0", "must be an integer >= 1 (got 0)"),
    (check.MAX_NEW_TOKENS, "lots", "must be an integer >= 1 (got 'lots')"),
    (check.MAX_NEW_TOKENS, "1e9",
     "must be an integer <= 4096 (half the model's 8192-token context) (got 1e9)"),
    (check.SECONDS, "inf", "must be a finite number (got inf)"),
])
def test_flag_types_use_the_same_messages(rng: Range, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as e:
        flag_number(rng)(text)
    assert str(e.value) == message


def test_flag_types_convert() -> None:
    assert flag_number(check.MAX_NEW_TOKENS)("1e3") == 1000
    assert flag_number(check.SECONDS)("2.5") == 2.5
    assert flag_choice(("a", "b"))("b") == "b"
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be one of a, b \(got 'c'\)$"):
        flag_choice(("a", "b"))("c")


# -- the YAML loader ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("1.0e9", 1.0e9), ("1e9", 1e9), ("-2E-3", -2e-3), (".5e1", 5.0), ("1.0e+9", 1e9), ("1_000", 1000),
    ("3", 3), ("0.5", 0.5), ("1e", "1e"), ("e9", "e9"), ("1.2.3e4", "1.2.3e4"),
])
def test_exponent_floats_are_numbers(text: str, value) -> None:
    # PyYAML's YAML 1.1 resolver reads "1e9" and "1.0e9" as strings; the testbed's loader does not
    got = parse_yaml(f"x: {text}\n", "t.yaml")["x"]
    assert got == value and type(got) is type(value)
    assert isinstance(yaml.safe_load("x: 1e9\n")["x"], str)  # the global loader is left as it was


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("a: 1\nb:\n  c: 2\n  c: 3\n")
    with pytest.raises(SpecError) as e:
        load_yaml(path)
    assert str(e.value) == f"{path}: yaml: line 4, column 3: duplicate key 'c' (first on line 3)"


def test_missing_file_named_by_another(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        load_yaml(tmp_path / "p.yaml", "s.yaml", "workload.prompts")
    assert str(e.value) == f"s.yaml: workload.prompts: {tmp_path / 'p.yaml'}: file not found"
    with pytest.raises(SpecError) as e:
        load_yaml(tmp_path)
    assert str(e.value) == f"{tmp_path}: file: not a regular file"


# -- absurd topology values --------------------------------------------------------------------

TOPO = """nodes:
  phone: {{role: device, cpu: {cpu}}}
  mec: {{role: edge, memory_mb: {mem}}}
links:
  - between: [phone, mec]
    up: {{bw_mbit: {bw}, delay_ms: {delay}, jitter_ms: {jitter}, queue_pkts: {queue}}}
"""
GOOD = {"cpu": 0.5, "mem": 256, "bw": 10, "delay": 15, "jitter": 1, "queue": 100}


@pytest.mark.parametrize(("key", "text", "field", "message"), [
    ("bw", "1e12", "links[0].up.bw_mbit", "must be <= 100000 (100 Gbit/s) (got 1000000000000.0)"),
    ("bw", "1.0e9", "links[0].up.bw_mbit", "must be <= 100000 (100 Gbit/s) (got 1000000000.0)"),
    ("delay", "1e12", "links[0].up.delay_ms", "must be <= 10000 (10 s) (got 1000000000000.0)"),
    ("jitter", "20", "links[0].up.jitter_ms", "must be <= delay_ms (15) (got 20)"),
    ("queue", "1e7", "links[0].up.queue_pkts",
     "must be an integer <= 100000 (150 MB of 1500-byte packets) (got 10000000.0)"),
    ("cpu", "1e9", "nodes.phone.cpu",
     f"must be <= {CORES} (the {CORES} cores of this machine) (got 1000000000.0)"),
    ("mem", str(MEMORY + 1), "nodes.mec.memory_mb",
     f"must be an integer <= {MEMORY} (the {MEMORY} MiB of this machine) (got {MEMORY + 1})"),
])
def test_absurd_topology_values(tmp_path: Path, key: str, text: str, field: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(TOPO.format(**{**GOOD, key: text}))
    with pytest.raises(SpecError) as e:
        load_topology(path)
    assert str(e.value) == f"{path}: {field}: {message}"


def test_exponent_values_load_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(TOPO.format(**{**GOOD, "bw": "1.0e3", "delay": "2e1", "queue": "1e3"}))
    up = load_topology(path).links[0].up
    assert (up.bw_mbit, up.delay_ms, up.queue_pkts) == (1000.0, 20.0, 1000)
    assert isinstance(up.queue_pkts, int)


# -- the model folder ------------------------------------------------------------------------------

def test_model_folder_with_only_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFileError) as e:
        check_model_path(tmp_path)
    assert str(e.value) == (f"{tmp_path}: model: not a checkpoint folder: no model.safetensors, "
                            "tokenizer.json (a checkpoint holds config.json, model.safetensors, "
                            "tokenizer.json)")
    assert isinstance(e.value, FileNotFoundError) and e.value.exit_code == 2  # older callers catch that
    with pytest.raises(SpecError, match=r"^s.yaml: model: .*/nope: no such checkpoint folder or .gguf file$"):
        check_model_path(tmp_path / "nope", "s.yaml")
    for name in CHECKPOINT_FILES:
        (tmp_path / name).write_text("x")
    assert check_model_path(tmp_path) == tmp_path


def test_prepare_model_dir_checks_the_folder_first(tmp_path: Path) -> None:
    from testbed.model.loading import prepare_model_dir

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SpecError, match="not a checkpoint folder: no model.safetensors, tokenizer.json"):
        prepare_model_dir(tmp_path)
