"""The results file: whole-line appends, torn last lines ignored and repaired, resume keys."""

from __future__ import annotations

import json

from testbed.experiments.results import append_record, done_keys, read_records, repair
from testbed.files import write_atomic


def test_append_and_read(tmp_path):
    path = tmp_path / "results.jsonl"
    for i in range(3):
        append_record(path, {"point": f"p{i}", "repeat": 0, "x": [1, 2, 3]})
    recs = read_records(path)
    assert [r["point"] for r in recs] == ["p0", "p1", "p2"]
    assert done_keys(recs) == {("p0", 0), ("p1", 0), ("p2", 0)}
    assert path.read_text().count("\n") == 3


def test_torn_last_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, {"point": "a", "repeat": 0})
    append_record(path, {"point": "b", "repeat": 1})
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(json.dumps({"point": "c", "repeat": 0}).encode()[:9])  # a crash mid-write
    assert [r["point"] for r in read_records(path)] == ["a", "b"]
    assert repair(path) == 9
    assert path.read_bytes() == whole
    append_record(path, {"point": "c", "repeat": 0})
    assert [r["point"] for r in read_records(path)] == ["a", "b", "c"]
    assert repair(path) == 0


def test_write_atomic_replaces(tmp_path):
    path = tmp_path / "f.txt"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_corrupt_line_is_skipped_and_named(tmp_path):
    from testbed.experiments.results import read_results

    path = tmp_path / "results.jsonl"
    append_record(path, {"point": "a", "repeat": 0})
    with open(path, "ab") as f:
        f.write(b"\x00\x00garbage{\n")  # a garbled line in the middle
        f.write(b"[1, 2]\n")  # JSON, but not a record
    append_record(path, {"point": "b", "repeat": 0})
    with open(path, "ab") as f:
        f.write(b'{"point": "c", "rep')  # torn at the end
    records, problems = read_results(path)
    assert [r["point"] for r in records] == ["a", "b"]
    assert len(problems) == 3
    assert problems[0].startswith(f"{path}:2: skipped a corrupt line")
    assert problems[1].startswith(f"{path}:3: skipped a line that is not a results record")
    assert problems[2] == f"{path}:5: skipped a torn last line (an interrupted write)"
    assert all("\n" not in p for p in problems)
    assert done_keys(records) == {("a", 0), ("b", 0)}
    assert read_results(tmp_path / "none.jsonl") == ([], [])
