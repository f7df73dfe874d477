"""When a split-inference client declares a stage failed: deadlines from the RTT and measured steps.

A step's deadline is twice its expected time plus one round trip to the next hop (the bound the
recovery bench checks), never below ``floor_ms`` (scheduling noise on a loaded machine must not
look like a failure).  The expected time comes from the steps measured so far: the median of the
recent decode steps for a one-token step, and the first prefill scaled by the number of tokens
for a prefill.  The very first prefill has nothing to go by and waits ``timeout_s``; so does the
re-prefill right after a recovery, generously (a false alarm there would leave no standby).
A dead node is usually noticed much sooner: its TCP connection drops (``StageFailed``).
A frozen one drops nothing; to know at the deadline which stage to replace, a step still unanswered
halfway to its deadline asks every stage whether it is alive (``ask_s``): the first one silent at
the deadline is the failed one (a live node answers once its forward pass is done;
a PING to a stage past a frozen one waits in the frozen one's queue).

A handover is told, not guessed: the run sends the device's driver the real-time signal
``SIGRTMIN + k`` once the network has moved the device, ``k`` being the candidate of the first stage
after the device (``mecA|mecB=...``) that serves the new cell (``handover_signal``); the driver
hears it through ``signal.set_wakeup_fd`` in the poll it waits in (``Moved``) and moves its session
there.
"""

from __future__ import annotations

import signal
import statistics
from collections import deque
from dataclasses import dataclass, field


class StageFailed(Exception):  # noqa: N818 - an event the client handles, not an error it reports
    """A stage stopped answering: ``stage`` (1: the device's next hop; None: unknown yet), why,
    and when it was noticed and the request sent (``time.perf_counter()``)."""

    def __init__(self, stage: int | None, why: str, detected_at: float, silent: list[int] | None = None
                 ) -> None:
        super().__init__(why)
        self.stage, self.why, self.detected_at = stage, why, detected_at
        self.sent_at = detected_at
        # the stages that had not answered the early probe by the deadline (None: none was asked)
        self.silent = silent


class Moved(Exception):  # noqa: N818 - an event the client handles, not an error it reports
    """The device moved to another cell: the first stage after it is now served by its candidate
    ``candidate`` (an index into that stage's nodes, primary first); noticed at ``noticed_at``
    (``time.perf_counter()``)."""

    def __init__(self, candidate: int, noticed_at: float) -> None:
        super().__init__(f"moved: candidate {candidate}")
        self.candidate, self.noticed_at = candidate, noticed_at
        self.sent_at = noticed_at  # the request in flight, if there was one


def handover_signal(candidate: int) -> int:
    """The signal that tells a driver to move its session to ``candidate`` (see ``Moved``)."""
    sig = signal.SIGRTMIN + candidate
    if not 0 <= candidate or sig > signal.SIGRTMAX:
        raise ValueError(f"no handover signal for candidate {candidate}")
    return sig


def moved_to(signals: bytes, candidates: int) -> int | None:
    """The last handover among the signal numbers a wakeup fd delivered (None: none of them)."""
    ks = [b - signal.SIGRTMIN for b in signals if 0 <= b - signal.SIGRTMIN < candidates]
    return ks[-1] if ks else None


@dataclass
class StepClock:
    floor_ms: float = 50.0
    timeout_s: float = 300.0
    rtt_ms: float = 0.0
    decode_ms: deque = field(default_factory=lambda: deque(maxlen=8))
    prefill_ms_per_token: float | None = None
    after_recovery: bool = False

    def observe(self, n_tokens: int, prefill: bool, ms: float) -> None:
        if prefill:
            if self.prefill_ms_per_token is None:
                self.prefill_ms_per_token = ms / max(1, n_tokens)
        elif n_tokens == 1:
            self.decode_ms.append(ms)

    def expected_ms(self, n_tokens: int, prefill: bool) -> float | None:
        if prefill:
            if self.prefill_ms_per_token is None:
                return None
            return self.prefill_ms_per_token * n_tokens
        if not self.decode_ms:
            return None
        return statistics.median(self.decode_ms)

    def deadline_s(self, n_tokens: int, prefill: bool) -> float:
        """How long to wait for this step's reply."""
        expected = self.expected_ms(n_tokens, prefill)
        if expected is None:
            return self.timeout_s
        if prefill:  # a re-prefill after a failure or an eviction: a slow one must not fail the run
            return min(self.timeout_s, (10 * expected + self.rtt_ms) / 1e3 + 1.0)
        return min(self.timeout_s, max(self.floor_ms, 2 * expected + self.rtt_ms) / 1e3)

    def ask_s(self, n_tokens: int, prefill: bool) -> float | None:
        """When, after the request, to ask every stage whether it is alive (a PING relayed to each),
        so that the first silent one is known at the deadline itself: halfway to it, one expected
        step and half an RTT after the request (half the floor where the floor sets the deadline).
        A live stage has finished its part of a normal step by then, and has as long again to
        answer across the links, whose round trips the expected step includes.  None: no early
        probe (no deadline to go by)."""
        if prefill or self.expected_ms(n_tokens, prefill) is None:
            return None
        return self.deadline_s(n_tokens, prefill) / 2

    def probe_s(self, stage: int) -> float:
        """How long a PING relayed to ``stage`` may take: ``stage`` links of about one RTT each, and
        a live node answers only once the forward pass it is computing is done."""
        step = self.expected_ms(1, False) or 0.0
        return max(self.floor_ms, 2 * step + 4 * self.rtt_ms * stage) / 1e3
