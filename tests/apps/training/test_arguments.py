"""``testbed train``'s flags: a bad ``--data`` is one line ``train: --data: ...`` and exit code 2 before
the model is prepared or any program starts (the device program used to die with a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.spec.bad_texts import bad_text

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
CELL = REPO / "topologies" / "cell-4.yaml"


def _train(capsys, *args: str) -> tuple[int, str]:
    from testbed.cli import main

    code = main(["train", *args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("kind,problem", [
    ("missing", "no such file"),
    ("directory", "is a directory, not a text file"),
    ("empty", "holds no text (empty)"),
    ("blank", "holds no text (only white space)"),
    ("latin1", "not UTF-8 text: byte 0xe9 at offset 3"),
    ("unreadable", "cannot read the file: Input/output error"),
    ("device", "is not a regular file (a FIFO, a device...), not a text file"),
    ("corpus", "no such file or built-in corpus (fortunes:NAME in /usr/share/games/fortunes, licenses:NAME "
               "in /usr/share/common-licenses)"),
])
def test_bad_data_is_one_line(tmp_path: Path, capsys, kind: str, problem: str) -> None:
    bad = bad_text(tmp_path, kind)
    code, err = _train(capsys, str(TOPO), "--placement", "phone=0:1,mec=1:4", "--data", bad)
    assert (code, err) == (2, f"train: --data: {problem} (got '{bad}')")


def test_every_entry_is_checked(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.txt"
    good.write_text("Plain words.\n")
    missing = tmp_path / "missing.txt"
    code, err = _train(capsys, str(CELL), "--placement", "dev1=0:1,mec=1:4", "--clients", "dev1,dev2",
                       "--data", f"{good},{missing}")
    assert (code, err) == (2, f"train: --data: no such file (got '{missing}')")


@pytest.mark.parametrize("args,devices", [
    (["--placement", "phone=0:1,mec=1:4"], "1 device"),
    (["--placement", "dev1=0:1,mec=1:4", "--clients", "dev1,dev2,dev3"], "3 devices"),
    (["--placement", "dev*=0:1,mec=1:4"], "4 devices"),  # the pattern matches cell-4's four devices
])
def test_one_file_per_device_or_one_for_all(tmp_path: Path, capsys, args: list[str], devices: str) -> None:
    a = tmp_path / "a.txt"
    a.write_text("Plain words.\n")
    data = ",".join([str(a)] * 2)
    code, err = _train(capsys, str(CELL if "dev" in args[1] else TOPO), *args, "--data", data)
    assert (code, err) == (2, f"train: --data: 2 files for {devices}: give one file (split among the "
                              f"devices) or one per device (got '{data}')")


def test_text_too_short_is_one_line_before_any_program(tiny4: Path, tmp_path: Path, capsys) -> None:
    """Too short for one batch needs the tokenizer: the parent tokenizes --data after preparing the
    model and before the network or any node program starts (nothing is written to --out)."""
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.\n")
    out = tmp_path / "out"
    code, err = _train(capsys, str(TOPO), "--placement", "phone=0:1,mec=1:4", "--model", str(tiny4),
                       "--data", str(short), "--out", str(out))
    assert code == 2
    assert err.startswith(f"train: --data: {short}: too short for one batch of 4 x 65 tokens: its training "
                          "part (the first 90%) needs 257 tokens (got ")
    assert not out.exists()
