"""The command line: every error is one line on stderr with a documented exit code, never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import cli
from testbed.spec.errors import EXIT_CODES

REPO = Path(__file__).resolve().parents[1]
TOPO = "topologies/device-edge-cloud.yaml"
PROMPTS = REPO / "experiments/prompts/short.yaml"


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.run([sys.executable, "-m", "testbed", *args], text=True, timeout=120, cwd=REPO, **kw)


def one_line(r: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a run that exited with ``code``."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (["infer", TOPO, "--placement", "phone=0:30", "--prompt", "hi", "--max-new-tokens", "0"],
     "infer: --max-new-tokens: must be an integer >= 1 (got 0)"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "many"],
     "generate: --max-new-tokens: must be an integer >= 1 (got 'many')"),
    (["infer", TOPO, "--placement", "phone=0:30", "--prompt", "hi", "--quant", "int3"],
     "infer: --quant: must be one of none, bf16, int8, int4 (got 'int3')"),
    (["probe", TOPO, "--src", "phone", "--dst", "mec", "--seconds", "1e9"],
     "probe: --seconds: must be <= 3600 (one hour) (got 1e9)"),
    (["up", TOPO, "--shaper", "netem"], "up: --shaper: must be one of auto, kernel, userspace (got 'netem')"),
    (["quant-eval", "--quant", "int4", "--max-tokens", "1"],
     "quant-eval: --max-tokens: must be an integer >= 2 (got 1)"),
    (["infer", TOPO, "--prompt", "hi"], "infer: --placement: required (see testbed infer --help)"),
    (["infer", TOPO, "--placement"], "infer: --placement: expected one argument (see testbed infer --help)"),
    ([], "testbed: command: missing: one of validate, trace-gen, up, probe, clean, demo, generate, "
         "quant-eval, infer, train, run, report, images, catalogue, cache-run, serve-bench "
         "(see testbed --help)"),
    (["fly"], "testbed: command: must be one of validate, trace-gen, up, probe, clean, demo, generate, "
              "quant-eval, infer, train, run, report, images, catalogue, cache-run, serve-bench (got 'fly')"),
    (["validate", TOPO, "--strict"], "testbed: --strict: unknown argument (see testbed --help)"),
])
def test_bad_flags(args: list[str], expected: str) -> None:
    r = run(*args)
    assert one_line(r, 2) == expected
    assert r.stdout == ""


# -- files ----------------------------------------------------------------------------------------

def test_model_folder_with_only_config_is_refused_before_the_network(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    for args in (["infer", TOPO, "--placement", "phone=0:30"], ["generate"]):
        r = run(*args, "--prompt", "hi", "--model", str(tmp_path))
        assert one_line(r, 2) == (f"{tmp_path}: model: not a checkpoint folder: no model.safetensors, "
                                  "tokenizer.json (a checkpoint holds config.json, model.safetensors, "
                                  "tokenizer.json)")
        assert r.stdout == ""


def test_absurd_topology_value(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text((REPO / TOPO).read_text().replace("bw_mbit: 50,", "bw_mbit: 1e12,"))
    assert one_line(run("validate", str(path)), 2) == (
        f"{path}: links[0].down.bw_mbit: must be <= 100000 (100 Gbit/s) (got 1000000000000.0)")


def test_probe_unknown_node_is_bad_input() -> None:
    assert one_line(run("probe", TOPO, "--src", "watch", "--dst", "mec"), 2) == (
        f"{TOPO}: src: no host named 'watch'")


def suite(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(f"topology: {REPO / TOPO}\nworkload: {{prompts: {PROMPTS}}}\nbaselines: [on-device]\n"
                    f"{extra}\n")
    return path


def test_run_suite_with_a_sweep_list(tmp_path: Path) -> None:
    path = suite(tmp_path, "sweep: [1, 2]")
    r = run("run", str(path), "--out", str(tmp_path / "out"))
    assert one_line(r, 2) == f"{path}: sweep: must be a mapping of parameter -> list of values (got [1, 2])"
    assert not (tmp_path / "out").exists()


def test_run_suite_with_too_many_devices_from_set(tmp_path: Path) -> None:
    path = suite(tmp_path, "")
    r = run("run", str(path), "--out", str(tmp_path / "out"), "--set", "workload.devices=2")
    assert one_line(r, 2) == ("--set: workload.devices: must be <= 1, the device nodes of "
                              "device-edge-cloud.yaml (phone) (got 2)")


def test_run_suite_with_a_duplicate_key(tmp_path: Path) -> None:
    path = suite(tmp_path, "repeats: 1\nrepeats: 2")
    assert one_line(run("run", str(path)), 2) == (
        f"{path}: yaml: line 5, column 1: duplicate key 'repeats' (first on line 4)")


# -- stdout closed by its reader ------------------------------------------------------------------

def test_stdout_closed_by_the_reader_is_quiet() -> None:
    """``testbed validate --json | head``: the reader is gone before the command writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = run("validate", "--json", "topologies/cell-4.yaml", stdout=write_end)
    finally:
        os.close(write_end)
    assert r.stderr == "" and r.returncode == 141


def test_validate_json_through_head() -> None:
    r = subprocess.run(f"{sys.executable} -m testbed validate --json topologies/cell-4.yaml | head -c 1",
                       shell=True, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.stdout == "{" and r.stderr == ""


# -- errors of commands that ran: one line, exit 1 (in-process, through the real dispatcher) -------

RAISERS = '''
from testbed.apps.inference.run import InferenceError
from testbed.net.probe import ProbeError


def probe_fails(args):
    raise ProbeError("iperf3 -c 10.0.1.2: exit code -9")


def node_dies(args):
    raise InferenceError("shard node on mec exited with 1 before it was ready\\nlog line 1\\nlog line 2")


def refused(args):
    raise PermissionError(1, "Operation not permitted", "/sys/fs/cgroup/cpu")


def bug(args):
    return {}["missing"]


def interrupted(args):
    raise KeyboardInterrupt


def other_pipe(args):
    raise BrokenPipeError(32, "Broken pipe")
'''


@pytest.fixture
def raisers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "tb_raisers.py").write_text(RAISERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def call(func: str, command: str = "probe") -> int:
        monkeypatch.setitem(cli.HANDLERS, command, f"tb_raisers:{func}")
        args = {"probe": [command, TOPO, "--src", "phone", "--dst", "mec"], "infer": [
            command, TOPO, "--placement", "phone=0:30", "--prompt", "hi"]}[command]
        return cli.main(args)
    return call


@pytest.mark.parametrize(("func", "command", "code", "line"), [
    ("probe_fails", "probe", 1, "probe: iperf3 -c 10.0.1.2: exit code -9"),
    ("node_dies", "infer", 1,
     "infer: shard node on mec exited with 1 before it was ready (TESTBED_DEBUG=1 shows 2 more lines)"),
    ("refused", "probe", 1,
     "probe: PermissionError: [Errno 1] Operation not permitted: '/sys/fs/cgroup/cpu'"),
    ("bug", "probe", 3, "probe: internal error: KeyError: 'missing' (TESTBED_DEBUG=1 shows the traceback)"),
    ("interrupted", "infer", 130, "infer: interrupted"),
    ("other_pipe", "probe", 1, "probe: [Errno 32] Broken pipe"),
])
def test_command_errors_are_one_line(raisers, capsys: pytest.CaptureFixture[str], func: str, command: str,
                                     code: int, line: str) -> None:
    assert raisers(func, command) == code
    err = capsys.readouterr().err
    assert err == line + "\n"


def test_debug_shows_the_traceback(raisers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        raisers("bug")


# -- the README ------------------------------------------------------------------------------------

def test_readme_documents_every_exit_code() -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Command line"):]
    section = section[:section.index("\n## ", 3)]
    for code in EXIT_CODES:
        assert re.search(rf"^\| `{code}` \|", section, re.M), f"exit code {code} not in README's Command line"
