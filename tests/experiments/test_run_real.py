"""Real runs of experiments/quick.yaml: real namespaces, shaped links, shard processes.

The tiny model (2 layers, hidden 64, built from code) keeps the default runs short; the
real SmolLM2 run is marked ``model``.  Checks: every metric present and plausible, bytes
per token equal to the codec's size x hidden per hop, measured/predicted within the
suite's band, the report, and that an interrupted or killed run resumes without
duplicating or losing records and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.experiments.results import read_records
from testbed.model.codecs import get_codec

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments/quick.yaml"
TINY = ["--set", "model=tiny", "--set", "params.cut=1"]
KINDS = {"on-device", "edge-offload", "cloud-offload", "split"}
STALL_MS = 100.0

pytestmark = [pytest.mark.root, pytest.mark.slow]


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "testbed", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background parent may have ignored it


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "testbed", *args],
        preexec_fn=_sigint_default,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def check_record(rec: dict) -> None:
    """Every metric present and plausible for one successful record."""
    assert rec["status"] == "ok", rec.get("error")
    m = rec["metrics"]
    p = rec["params"]
    info = rec["config"]["model"]
    n = m["tokens"]
    assert 0 < n <= p["max_new_tokens"]  # greedy decoding may stop early at an end-of-sequence token
    assert m["prompt_tokens"] > 5
    lat = m["token_latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
    assert 0 < lat["mean"] <= lat["max"]
    assert 0 < m["ttft_ms"] < m["e2e_ms"]
    assert m["tokens_per_s"] == pytest.approx(n / (m["e2e_ms"] / 1e3), rel=1e-3)
    hops = m["per_hop"]
    layers = [h["layers"] for h in hops]
    assert layers == [part.split("=")[1] for part in rec["placement"].split(",")]
    for h in hops:
        assert h["compute_ms"] >= 0 and h["cpu_ms"] is not None and h["cpu_ms"] >= 0
        start_l, end_l = map(int, h["layers"].split(":"))
        if end_l > start_l:
            assert h["compute_ms"] > 0
            held = m["prompt_tokens"] + n - 1  # the last generated token is never fed back
            per_position = 2 * info["kv_heads"] * info["head_dim"] * 4  # K and V, fp32
            assert h["kv_cache_bytes"] == (end_l - start_l) * per_position * held
    sent_tokens = m["prompt_tokens"] + n - 1  # KV cache on: the prompt once, then one token per step
    assert m["positions_sent"] == sent_tokens
    if rec["kind"] == "on-device":
        assert len(hops) == 1 and m["bytes_up"] == 0 and m["bytes_down"] == 0
        assert m["energy"]["radio_j"] == 0
    else:
        first_downstream = hops[1]
        per_token = (
            8
            if first_downstream["layers"].startswith("0:")
            else get_codec(p["codec"]).bytes_per_token(info["hidden"])
        )  # offload: int64 token ids; split: codec size x hidden
        assert first_downstream["payload_up"] == per_token * sent_tokens
        for h in hops[2:]:  # later hops always carry hidden states
            assert h["payload_up"] == get_codec(p["codec"]).bytes_per_token(info["hidden"]) * sent_tokens
        assert m["bytes_up"] == first_downstream["bytes_up"] > first_downstream["payload_up"]
        assert m["bytes_down"] > 0 and m["transfer_ms"] > 0
        assert m["energy"]["radio_j"] > 0
    e = m["energy"]
    assert e["label"].startswith("estimate") and e["total_j"] > 0 and e["compute_j"] >= 0
    pred = m["predicted"]
    assert pred["e2e_ms"] > 0
    low, high = rec["config"]["analytic_band"]
    # The band, plus one scheduler stall: the tiny model's on-device run is ~10 ms, and one
    # vCPU slice the hypervisor takes (CI measured 51 ms unexplained in such a run) is no model error.
    assert low * pred["e2e_ms"] - STALL_MS <= m["e2e_ms"] <= high * pred["e2e_ms"] + STALL_MS, (
        rec["point"], m["e2e_ms"], pred)
    if pred["e2e_ms"] > 10 * STALL_MS:  # where a stall cannot matter, the band itself
        assert low <= m["ratio"]["e2e"] <= high, (rec["point"], m["e2e_ms"], pred)
    env = rec["environment"]
    assert env["kernel"] and env["cpu"] and env["packages"]["torch"] and env["git_commit"]
    assert rec["shaper"] in ("kernel", "userspace")
    assert rec["topology"]["nodes"]["phone"]


@pytest.fixture(scope="module")
def quick_tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick-tiny")
    proc = run_cli("run", str(QUICK), "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_quick_records(quick_tiny):
    recs = read_records(quick_tiny / "results.jsonl")
    assert {r["kind"] for r in recs} == KINDS
    assert len(recs) == 7 and len({(r["point"], r["repeat"]) for r in recs}) == 7
    for rec in recs:
        check_record(rec)
    split = [r for r in recs if r["kind"] == "split"]
    assert {r["params"]["uplink_mbit"] for r in split} == {2, 20}
    slow, fast = sorted(split, key=lambda r: r["params"]["uplink_mbit"])
    # at 2 Mbit/s the prompt's activations take longer to upload than at 20
    assert slow["metrics"]["ttft_ms"] > fast["metrics"]["ttft_ms"]


def test_quick_report(quick_tiny):
    proc = run_cli("report", str(quick_tiny), timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = (quick_tiny / "summary.md").read_text()
    for name in (
        "on-device",
        "edge-offload/uplink_mbit=2",
        "cloud-offload/uplink_mbit=20",
        "split/uplink_mbit=2",
    ):
        assert f"| {name} |" in summary
    assert "When does end-edge cooperation win?" in summary
    for png in ("latency_vs_uplink.png", "bytes_per_token.png", "measured_vs_predicted.png"):
        assert (quick_tiny / png).stat().st_size > 10_000
        assert f"({png})" in summary


def test_failed_point_is_recorded_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "out"
    # 16 MiB is too little for a shard process: that point fails at run time, the other runs
    proc = run_cli("run", str(QUICK), "--out", str(out), *TINY, "--only", "placement=split,uplink_mbit=2",
                   "--set", "sweep.nodes.mec.memory_mb=[16, 2048]")
    assert proc.returncode == 1, proc.stderr[-2000:]
    recs = read_records(out / "results.jsonl")
    assert [r["params"]["nodes.mec.memory_mb"] for r in recs] == [16, 2048]
    failed, ok = recs
    assert failed["status"] == "error" and failed["error"] and "traceback" in failed
    assert "metrics" not in failed
    check_record(ok)


def _run_ids(owner: int) -> set[str]:
    from testbed.net.naming import load_states

    return {s["run_id"] for s in load_states() if s.get("owner_pid") == owner}


def _leftovers(run_ids: set[str]) -> list[str]:
    from testbed.net.clean import marked_processes
    from testbed.net.naming import load_states

    left = [f"process {pid}" for pid, rid in marked_processes().items() if rid in run_ids]
    left += [f"state {s['run_id']}" for s in load_states() if s["run_id"] in run_ids]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += [f"link of {rid}" for rid in run_ids if f"tb{rid}" in links]
    return left


def _wait_for_records(
    path: Path, n: int, proc: subprocess.Popen, seen: set[str], timeout: float = 600
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen |= _run_ids(proc.pid)
        if len(read_records(path)) >= n:
            return
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        time.sleep(0.2)
    raise AssertionError(f"no {n} records after {timeout} s")


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_run_resumes(tmp_path, how):
    out = tmp_path / "out"
    args = [
        "run",
        str(QUICK),
        "--out",
        str(out),
        *TINY,
        "--only",
        "placement=split",
        "--set",
        "sweep.uplink_mbit=[2, 20, 50]",
    ]
    results = out / "results.jsonl"
    proc = start(*args)
    run_ids: set[str] = set()
    try:
        _wait_for_records(results, 1, proc, run_ids)
        # interrupt while the second point runs: its network is up (its state file exists)
        deadline = time.monotonic() + 60
        while not _run_ids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2)  # shard nodes starting or generating
        run_ids |= _run_ids(proc.pid)
        assert len(read_records(results)) == 1
        os.kill(proc.pid, signal.SIGINT if how == "sigint" else signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first = read_records(results)
    assert len(first) == 1  # only the finished point
    assert results.read_bytes().endswith(b"\n")
    if how == "sigint":
        assert proc.returncode == 130
        assert _leftovers(run_ids) == []
    else:  # a killed run leaves its network: clean removes it (only runs whose owner is dead)
        assert run_cli("clean", "--dead-only", timeout=120).returncode == 0
        assert _leftovers(run_ids) == []
    proc2 = run_cli(*args, "--resume")
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    recs = read_records(results)
    keys = [(r["point"], r["repeat"]) for r in recs]
    assert len(keys) == 3 and len(set(keys)) == 3
    assert recs[0] == first[0]  # the finished record is kept as it was, not re-run
    assert {r["params"]["uplink_mbit"] for r in recs} == {2, 20, 50}
    proc3 = run_cli(*args, "--resume")  # nothing left to do
    assert proc3.returncode == 0 and len(read_records(results)) == 3


def test_resume_runs_a_torn_record_again(tmp_path):
    out = tmp_path / "out"
    args = ["run", str(QUICK), "--out", str(out), *TINY, "--only", "placement=on-device"]
    assert run_cli(*args).returncode == 0
    results = out / "results.jsonl"
    whole = results.read_bytes()
    (first,) = read_records(results)
    results.write_bytes(b"garbage\n" + whole[: len(whole) // 2])  # a garbled line, then a crash mid-write
    proc = run_cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{results}:1: skipped a corrupt line" in proc.stderr
    assert f"{results}:2: skipped a torn last line" in proc.stderr
    assert "Traceback" not in proc.stderr
    (again,) = read_records(results)  # the torn point ran again; the garbled line stays, skipped
    assert results.read_bytes().startswith(b"garbage\n") and results.read_bytes().endswith(b"\n")
    assert (again["point"], again["repeat"]) == (first["point"], first["repeat"]) == ("on-device", 0)
    assert again["started_at"] >= first["started_at"]
    check_record(again)
    assert run_cli("report", str(out), timeout=120).returncode == 0


@pytest.mark.model
def test_quick_real_model(tmp_path):
    out = tmp_path / "quick"
    t0 = time.monotonic()
    proc = run_cli("run", str(QUICK), "--out", str(out))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = read_records(out / "results.jsonl")
    assert {r["kind"] for r in recs} == KINDS and len(recs) == 7
    for rec in recs:
        check_record(rec)
        assert "Paris" in rec["text"], rec["text"]
    assert run_cli("report", str(out), timeout=120).returncode == 0
    print(json.dumps({"quick_elapsed_s": round(elapsed, 1)}))
