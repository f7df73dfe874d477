"""Host-wide settings a run changes: recorded as found, put back when the run ends, handed over
while another live run still needs them.  On a sysctl tree of the test's own (the machine's is
shared with other runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.net import hostwide
from testbed.net.naming import RunState, hand_over


@pytest.fixture
def sysctls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "sys"
    for key, value in [*((k, "1") for k in hostwide.BRIDGE_NF), (hostwide.TCP_ALLOWED, "reno cubic")]:
        p = root / key.replace(".", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(value + "\n")
    monkeypatch.setattr(hostwide, "SYSCTL_ROOT", root)
    return root


def allow(cc: str):
    return lambda: hostwide.write(hostwide.TCP_ALLOWED, f"{hostwide.read(hostwide.TCP_ALLOWED)} {cc}")


def test_changed_settings_are_recorded_and_put_back(sysctls: Path):
    changed = hostwide.bridge_nf_off()
    assert changed == dict.fromkeys(hostwide.BRIDGE_NF, "1")
    assert all(hostwide.read(k) == "0" for k in hostwide.BRIDGE_NF)
    changed |= hostwide.allowed_tcp_cc(allow("bbr"))
    assert changed[hostwide.TCP_ALLOWED] == "reno cubic"
    assert hostwide.read(hostwide.TCP_ALLOWED) == "reno cubic bbr"
    done = hostwide.restore(changed, others_need=[])
    assert len(done) == 4
    assert all(hostwide.read(k) == "1" for k in hostwide.BRIDGE_NF)
    assert hostwide.read(hostwide.TCP_ALLOWED) == "reno cubic"


def test_settings_already_right_are_never_touched(sysctls: Path):
    for k in hostwide.BRIDGE_NF:
        hostwide.write(k, "0")  # as provisioning sets them
    assert hostwide.bridge_nf_off() == {}
    assert hostwide.allowed_tcp_cc(lambda: None) == {}


def test_a_setting_another_live_run_needs_is_handed_over(sysctls: Path, tmp_path: Path):
    first = RunState("aaaaa", tmp_path / "state")
    second = RunState("bbbbb", tmp_path / "state")
    first.set_host_settings(hostwide.bridge_nf_off() | hostwide.allowed_tcp_cc(allow("bbr")),
                            {"bridge_nf_off": True, "tcp_cc": "bbr"})
    second.set_host_settings(hostwide.bridge_nf_off() | hostwide.allowed_tcp_cc(lambda: None),
                             {"bridge_nf_off": True, "tcp_cc": "bbr"})
    assert second.host_settings_changed() == {}  # it found everything as it needs it
    # the first run ends while the second lives: nothing the second needs is taken away ...
    hostwide.restore(first.host_settings_changed(), [second.data["host_settings"]["needs"]],
                     lambda k, v: hand_over(second.path, k, v))
    assert all(hostwide.read(k) == "0" for k in hostwide.BRIDGE_NF)
    assert hostwide.read(hostwide.TCP_ALLOWED) == "reno cubic bbr"
    # ... and the second puts back what the first found
    assert second.host_settings_changed() == {**dict.fromkeys(hostwide.BRIDGE_NF, "1"),
                                              hostwide.TCP_ALLOWED: "reno cubic"}
    hostwide.restore(second.host_settings_changed(), [])
    assert all(hostwide.read(k) == "1" for k in hostwide.BRIDGE_NF)
    assert hostwide.read(hostwide.TCP_ALLOWED) == "reno cubic"
