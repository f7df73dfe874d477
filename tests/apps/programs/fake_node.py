"""A node program for the launcher's tests: typed settings, then one of a few behaviours.

    python tests/apps/programs/fake_node.py --settings '{"mode": "serve", ...}'
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

MODES = ("serve", "die-before-ready", "die-after-ready", "hang", "stubborn", "burn", "report")


@dataclass(frozen=True)
class FakeSettings:
    mode: str
    delay_s: float = 0.0  # die-after-ready: seconds before exiting
    cpu_s: float = 0.0  # burn: CPU seconds to use after the ready line
    log_lines: int = 0  # lines written to stderr first
    exit_code: int = 3
    then_exit: bool = False  # burn: exit afterwards instead of serving on
    threads: int = 1

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.mode not in MODES:
            yield "mode", f"must be one of {', '.join(MODES)}"
        if self.delay_s < 0:
            yield "delay_s", "must be >= 0"
        if not 0 <= self.exit_code <= 255:
            yield "exit_code", "must be in 0..255"


STOP: list[int] = []


def serve_until_term() -> int:
    while not STOP:
        time.sleep(0.02)
    return 0


def main() -> int:
    from testbed.apps.launch import announce_ready, read_settings

    s = read_settings(FakeSettings, prog="fake_node")
    # before the ready line: a stop may come the moment the launcher reads it
    signal.signal(signal.SIGTERM, lambda *_: STOP.append(1))
    for i in range(s.log_lines):
        print(f"log line {i}", file=sys.stderr)
    if s.mode == "die-before-ready":
        return s.exit_code
    if s.mode == "hang":
        time.sleep(3600)
    if s.mode == "stubborn":  # ignores SIGTERM (says so in its log): only SIGKILL ends it
        signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM ignored", file=sys.stderr, flush=True))
        announce_ready()
        while True:
            time.sleep(0.05)
    announce_ready(f"pid={os.getpid()}")
    if s.mode == "die-after-ready":
        time.sleep(s.delay_s)
        return s.exit_code
    if s.mode == "burn":
        t0 = time.process_time()
        while time.process_time() - t0 < s.cpu_s:
            pass
        print("BURNT", flush=True)
        return 0 if s.then_exit else serve_until_term()
    if s.mode == "report":
        keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TESTBED_OMP", "OMP_WAIT_POLICY")
        print(json.dumps({"threads": s.threads, **{k: os.environ.get(k) for k in keys}}), flush=True)
        return 0
    return serve_until_term()


if __name__ == "__main__":
    sys.exit(main())
