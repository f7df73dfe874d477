"""The environment stored with every record names the code's commit, in a checkout or a copy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from testbed.experiments import environment

REPO = Path(__file__).resolve().parents[2]


def test_a_checkout_names_its_own_commit() -> None:
    env = environment.collect(REPO)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    head = git.stdout.strip()
    assert env["git_commit"] == head and isinstance(env["git_dirty"], bool)
    assert env["packages"]["torch"] and env["cpus"] >= 1


def test_a_copy_without_git_takes_the_commit_its_sender_gives(tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "testbed", copy / "testbed")  # as the VM's /testbed: no .git
    monkeypatch.delenv("TESTBED_GIT_COMMIT", raising=False)
    assert environment.collect(copy)["git_commit"] is None
    monkeypatch.setenv("TESTBED_GIT_COMMIT", "0123abcd" * 5)
    monkeypatch.setenv("TESTBED_GIT_DIRTY", " M README.md")
    env = environment.collect(copy)
    assert env["git_commit"] == "0123abcd" * 5 and env["git_dirty"] is True
    monkeypatch.setenv("TESTBED_GIT_DIRTY", "")
    assert environment.collect(copy)["git_dirty"] is False
