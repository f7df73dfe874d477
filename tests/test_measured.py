"""The measured-test mark itself: a real failure is raised after its tries, a pass returns, an
unfit machine skips, and each try reports the machine's readings (this machine's /proc/stat)."""

from __future__ import annotations

import pytest

from tests import measured


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measured, "PAUSE_S", 0.0)
    monkeypatch.setattr(measured, "QUIET_BUSY_PCT", 100.0)  # fit at once: this is about the tries
    monkeypatch.setattr(measured, "MAX_TIMER_LATE_US", 1e9)
    monkeypatch.setattr(measured, "MAX_STOLEN_PCT", 100.0)


def test_a_failure_in_every_try_fails_the_test(capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    @measured.MEASURED
    def always_off() -> None:
        calls.append(1)
        raise AssertionError("rate 150 vs 200")

    with pytest.raises(AssertionError, match="rate 150"):
        always_off()
    assert len(calls) == measured.FAILURES
    out = capsys.readouterr().out
    assert out.count(") failed; during it: ") == measured.FAILURES and "% busy" in out and "us late" in out


def test_a_pass_after_a_failure_passes(capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    @measured.MEASURED
    def second_time_right(x: int) -> None:
        calls.append(x)
        assert len(calls) == 2

    second_time_right(7)
    assert calls == [7, 7]
    assert "try 2 passed" in capsys.readouterr().out


def test_an_unfit_machine_skips_without_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measured, "MAX_TIMER_LATE_US", -1.0)  # no timer is that punctual
    monkeypatch.setattr(measured, "FIT_WAIT_S", 0.0)
    calls = []

    @measured.MEASURED
    def never_run() -> None:
        calls.append(1)

    with pytest.raises(pytest.skip.Exception, match="not fit to emulate links .* us late"):
        never_run()
    assert calls == []


def test_a_skip_after_a_failed_try_names_the_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    @measured.MEASURED
    def off_then_unfit() -> None:
        calls.append(1)
        monkeypatch.setattr(measured, "MAX_TIMER_LATE_US", -1.0)  # unfit from the next try on
        monkeypatch.setattr(measured, "FIT_WAIT_S", 0.0)
        raise AssertionError("rate 150 vs 200")

    with pytest.raises(pytest.skip.Exception, match="try 2: .* try 1 had failed: rate 150 vs 200"):
        off_then_unfit()
    assert calls == [1]
