"""Analytic step time and activation memory of pipeline training (GPipe and 1F1B), and a small simulator.

A training step pushes ``M`` micro-batches through ``P`` stages in a chain (stage 0: the device).  Stage
p needs ``f_p`` ms for one micro-batch's forward and ``b_p`` for its backward; hop h (between stages h
and h+1) moves a micro-batch's activations forward in ``sf_h = bytes * 8 / rate`` ms plus the one-way
latency ``l_h``, and its activation gradients back in ``sb_h + l_h`` (full duplex: the two directions do
not share the link; a direction carries one message at a time, latency does not occupy it).

**GPipe** (all forwards, then all backwards) is a flow line of identical jobs, whose makespan is exact:
``sum of the stage and transfer times + (M - 1) * the slowest server's time``, once for the forward wave
and once for the backward wave:

    T = [sum f_p + sum (sf_h + l_h) + (M-1) max(f_p, sf_h)]
      + [sum b_p + sum (sb_h + l_h) + (M-1) max(b_p, sb_h)]

With equal stages and free links this is ``(M + P - 1)(f + b)``: an ideal ``M(f + b)`` plus the bubble,
whose share of the step is ``(P - 1) / (M + P - 1)``.

**1F1B** (PipeDream-flush: stage p runs ``min(P - p - 1, M)`` warm-up forwards, then alternates one
forward and one backward, then drains) has the same bubble with equal stages, but a stage holds at most
``P - p`` micro-batches of activations instead of ``M``.  Its strict alternation ties the stages together
(a stage cannot run a forward ahead while it waits for a gradient), so no single sum gives its makespan
when stages or links differ.  The model takes the longest of these paths through the schedule, each a
sum of known times: the first micro-batch's round trip plus one stage busy without a break; the round
trip plus a link direction busy without a break; and for each pair of stages p < q, the loop "forward
from p to q, backward from q to p", which carries ``q - p + 1`` micro-batches per turn, taken as often
as the micro-batches allow.  Every path is a real chain of dependencies, so the figure never exceeds the
true makespan; it is exact with equal stages and free links, and in the tests within 12% of
:func:`simulate` (stages within 4x of each other, latencies up to 20 ms).  :func:`simulate` evaluates
the same schedule exactly, op by op (the max-plus recursion; no randomness), for callers that want the
exact figure of the model rather than its closed form.

Each stage's optimizer update (``update_ms``) runs after its last backward; the step ends when the last
stage is done.

A link rests between waves, longer than TCP's retransmission timeout when a step takes seconds, so the
first message of each wave, each way, pays slow start again (``Hop.forward_restart_ms`` and
``backward_restart_ms``, from ``testbed.net.tcp_model``); the messages behind it find the window open.
With one micro-batch every message is a wave's first and the figure is exact; with more, the closed
form counts the restart whole where later micro-batches' slack may absorb part of it (:func:`simulate`
lets it).
Without it the model missed 4-hop steps by 26-32 % (a 590 kB message over the 40 ms round trip to the
cloud took 240 ms where its rate says 12).

**U-shaped** runs (the device keeps the final norm, the head and the loss) are a pipeline of ``P + 1``
stages: the device's head is the last, reached from the last server over the whole chain backwards
(its output relayed up to the device, the head's gradient relayed back down), which :func:`relayed`
folds into one hop.  The model lets the head run while the device's own layers do, which one CPU does
not: it is a lower bound there.

Public API: ``SCHEDULES``, :class:`Stage`, :class:`Hop`, :class:`StageTimes`, :class:`Prediction`,
:func:`bubble_fraction`, :func:`peak_micro_batches`, :func:`schedule_ops`, :func:`predict`,
:func:`simulate`, :func:`simulated_peaks`, :func:`relayed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, per micro-batch: compute times (ms) and the activations kept for backward."""

    forward_ms: float
    backward_ms: float
    activation_bytes: int = 0
    update_ms: float = 0.0  # the optimizer step after the last backward (once per step)


@dataclass(frozen=True)
class Hop:
    """The link after a stage, per micro-batch: bytes each way, rate (bit/s, each way), one-way latency."""

    forward_bytes: int
    backward_bytes: int
    rate_bps: float
    latency_ms: float = 0.0
    # what the first message of a wave adds, each way, on a link that rested since the last wave (TCP's
    # slow start after idle, ``testbed.net.tcp_model.slow_start_s``); later ones find the window open
    forward_restart_ms: float = 0.0
    backward_restart_ms: float = 0.0

    @property
    def forward_ms(self) -> float:
        """Time the activations occupy the link (serialization; latency excluded)."""
        return self.forward_bytes * 8e3 / self.rate_bps

    @property
    def backward_ms(self) -> float:
        return self.backward_bytes * 8e3 / self.rate_bps


def relayed(forward_bytes: int, backward_bytes: int, links: Sequence[tuple[float, float, float]]) -> Hop:
    """One hop standing for links crossed in a row by relays that each take a whole message before
    sending it on (the U-shaped return leg): serialization times add up, and so do latencies.
    ``links``: (rate of the forward direction, rate of the backward direction (bit/s), one-way latency
    ms) each, in the order crossed.  The backward bytes are scaled to take their own rates' time."""
    if not links:
        raise ValueError("a relayed hop needs at least one link")
    inv_f = sum(1.0 / f for f, _, _ in links)
    inv_b = sum(1.0 / b for _, b, _ in links)
    return Hop(forward_bytes, round(backward_bytes * inv_b / inv_f), 1.0 / inv_f,
               sum(lat for _, _, lat in links))


@dataclass(frozen=True)
class StageTimes:
    """One stage over one step: busy time per direction, idle time, activation memory at its peak."""

    forward_ms: float
    backward_ms: float
    idle_ms: float
    peak_micro_batches: int
    peak_activation_bytes: int


@dataclass(frozen=True)
class Prediction:
    schedule: str
    micro_batches: int
    step_ms: float
    bubble_fraction: float  # mean share of the step a stage spends neither computing nor updating
    stages: tuple[StageTimes, ...]
    hop_transfer_ms: tuple[tuple[float, float], ...]  # per hop: (forward, backward) link busy time per step


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The pipeline bubble's share of a step with equal stages and free links: (P-1)/(M+P-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def peak_micro_batches(stage: int, stages: int, micro_batches: int, schedule: str) -> int:
    """Micro-batches whose activations ``stage`` holds at once: M for GPipe, min(P - p, M) for 1F1B."""
    _check(schedule, stages, micro_batches)
    return micro_batches if schedule == "gpipe" else min(stages - stage, micro_batches)


def schedule_ops(stage: int, stages: int, micro_batches: int, schedule: str) -> list[tuple[str, int]]:
    """The order in which ``stage`` runs its work: ("F" | "B", micro-batch) pairs."""
    _check(schedule, stages, micro_batches)
    m_all = range(micro_batches)
    if schedule == "gpipe":
        return [("F", m) for m in m_all] + [("B", m) for m in m_all]
    warm = min(stages - stage - 1, micro_batches)
    ops = [("F", m) for m in range(warm)]
    for i in range(micro_batches - warm):
        ops += [("F", warm + i), ("B", i)]
    return ops + [("B", m) for m in range(micro_batches - warm, micro_batches)]


def _check(schedule: str, stages: int, micro_batches: int, hops: int | None = None) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got {stages} and {micro_batches}")
    if hops is not None and hops != stages - 1:
        raise ValueError(f"{stages} stages need {stages - 1} hops, got {hops}")


def _result(stages: Sequence[Stage], hops: Sequence[Hop], m: int, schedule: str,
            finish: Sequence[float], peaks: Sequence[int] | None = None) -> Prediction:
    step = max(f + s.update_ms for f, s in zip(finish, stages, strict=True))
    times = []
    for p, s in enumerate(stages):
        busy = m * (s.forward_ms + s.backward_ms) + s.update_ms
        peak = peaks[p] if peaks is not None else peak_micro_batches(p, len(stages), m, schedule)
        times.append(StageTimes(m * s.forward_ms, m * s.backward_ms, step - busy, peak,
                                peak * s.activation_bytes))
    bubble = sum(t.idle_ms for t in times) / (len(times) * step) if step > 0 else 0.0
    return Prediction(schedule, m, step, bubble, tuple(times),
                      tuple((m * h.forward_ms, m * h.backward_ms) for h in hops))


def predict(stages: Sequence[Stage], hops: Sequence[Hop], micro_batches: int, schedule: str) -> Prediction:
    """The closed-form model of one step (see the module's text)."""
    _check(schedule, len(stages), micro_batches, len(hops))
    m = micro_batches
    f = [s.forward_ms for s in stages]
    b = [s.backward_ms for s in stages]
    # forward wave, stage by stage: D_p = C_p + (m-1) * tau_p (C: sum of times so far, tau: slowest so far)
    c, tau, fwd_end = 0.0, 0.0, []
    for p in range(len(stages)):
        if p:
            h = hops[p - 1]
            c += h.forward_ms + h.latency_ms + h.forward_restart_ms
            tau = max(tau, h.forward_ms)
        c += f[p]
        tau = max(tau, f[p])
        fwd_end.append(c + (m - 1) * tau)
    if schedule == "gpipe":
        # backward wave from the last stage down, starting when its forwards are done
        start, c, tau = fwd_end[-1], 0.0, 0.0
        finish = [0.0] * len(stages)
        for p in reversed(range(len(stages))):
            if p < len(stages) - 1:
                h = hops[p]
                c += h.backward_ms + h.latency_ms + h.backward_restart_ms
                tau = max(tau, h.backward_ms)
            c += b[p]
            tau = max(tau, b[p])
            finish[p] = start + c + (m - 1) * tau
        return _result(stages, hops, m, schedule, finish)
    return _result(stages, hops, m, schedule, _one_f_one_b(stages, hops, m))


def _one_f_one_b(stages: Sequence[Stage], hops: Sequence[Hop], m: int) -> list[float]:
    """Per-stage end of the last backward under 1F1B: the longest of a few paths through the schedule."""
    n = len(stages)
    f = [s.forward_ms for s in stages]
    b = [s.backward_ms for s in stages]
    down = [0.0] * n  # first micro-batch's forward from stage 0 to the start of stage p
    back = [0.0] * n  # a gradient's way from the end of stage p's backward to the end of stage 0's
    for p in range(1, n):
        h = hops[p - 1]
        down[p] = down[p - 1] + f[p - 1] + h.forward_ms + h.latency_ms + h.forward_restart_ms
        back[p] = back[p - 1] + b[p - 1] + h.backward_ms + h.latency_ms + h.backward_restart_ms
    trip = [0.0] * n  # from stage p's forward start to its backward end, one micro-batch alone
    for p in reversed(range(n)):
        trip[p] = f[p] + b[p]
        if p < n - 1:
            h = hops[p]
            trip[p] += (h.forward_ms + h.backward_ms + 2 * h.latency_ms + h.forward_restart_ms
                        + h.backward_restart_ms + trip[p + 1])
    paths = [down[-1] + trip[-1] + back[-1]]
    for p in range(n):
        warm = min(n - p - 1, m)
        # stage p busy from its first forward to its last backward, waiting once for the first gradient
        paths.append(down[p] + trip[p] + (m - 1 - warm) * f[p] + (m - 1) * b[p] + back[p])
        paths.append(down[p] + m * (f[p] + b[p]) + back[p])
        for q in range(p + 1, n):
            # F_p(j) -> down to q -> B_q(j - w_q) -> back to B_p -> F_p(j + q - p + 1): a loop carrying
            # q - p + 1 micro-batches, open from j = w_q (q's warm-up) on
            w_q, s = min(n - q - 1, m), q - p + 1
            if m - 1 < w_q:
                continue
            k = (m - 1 - w_q) // s
            rest = m - 1 - w_q - k * s
            turns = k * _loop(stages, hops, p, q) + rest * b[p]
            paths.append(down[p] + w_q * f[p] + turns + trip[p] + back[p])
    for hop in hops:  # a link direction that never rests
        paths.append(trip[0] + (m - 1) * max(hop.forward_ms, hop.backward_ms))
    end = max(paths)
    return [end - back[p] for p in range(n)]


def _loop(stages: Sequence[Stage], hops: Sequence[Hop], p: int, q: int) -> float:
    """One micro-batch's forward from stage p to q and its backward from q back to p, transfers included."""
    t = sum(s.forward_ms + s.backward_ms for s in stages[p : q + 1])
    return t + sum(h.forward_ms + h.backward_ms + 2 * h.latency_ms for h in hops[p:q])


def simulate(stages: Sequence[Stage], hops: Sequence[Hop], micro_batches: int, schedule: str) -> Prediction:
    """Discrete-event run of the schedule: each stage runs :func:`schedule_ops` in order, each op starting
    when the stage is free and its input has arrived; each link direction is a FIFO server."""
    n = len(stages)
    _check(schedule, n, micro_batches, len(hops))
    ops = [schedule_ops(p, n, micro_batches, schedule) for p in range(n)]
    arrive: dict[tuple[str, int, int], float] = {("F", 0, m): 0.0 for m in range(micro_batches)}
    free = [0.0] * n
    link = {("F", h): 0.0 for h in range(n - 1)} | {("B", h): 0.0 for h in range(n - 1)}
    nxt = [0] * n
    moved = True
    while moved:
        moved = False
        for p in range(n):
            while nxt[p] < len(ops[p]):
                kind, m = ops[p][nxt[p]]
                ready = arrive.get((kind, p, m))
                if ready is None:
                    break  # its input is not there yet: another stage must move first
                s = stages[p]
                end = max(free[p], ready) + (s.forward_ms if kind == "F" else s.backward_ms)
                free[p] = end
                if kind == "F" and p == n - 1:
                    arrive[("B", p, m)] = end  # the loss: backward may start at once
                elif kind == "F":
                    h = hops[p]
                    cold = h.forward_restart_ms if m == 0 else 0.0  # the wave's first message
                    sent = max(end, link[("F", p)]) + h.forward_ms + cold
                    link[("F", p)] = sent
                    arrive[("F", p + 1, m)] = sent + h.latency_ms
                elif p > 0:
                    h = hops[p - 1]
                    cold = h.backward_restart_ms if m == 0 else 0.0
                    sent = max(end, link[("B", p - 1)]) + h.backward_ms + cold
                    link[("B", p - 1)] = sent
                    arrive[("B", p - 1, m)] = sent + h.latency_ms
                nxt[p] += 1
                moved = True
    if any(nxt[p] < len(ops[p]) for p in range(n)):
        raise RuntimeError(f"schedule {schedule} deadlocks: stages stopped at ops {nxt}")
    return _result(stages, hops, micro_batches, schedule, free, simulated_peaks(n, micro_batches, schedule))


def simulated_peaks(stages: int, micro_batches: int, schedule: str) -> list[int]:
    """Peak in-flight micro-batches per stage, counted along each stage's op order (for the tests)."""
    out = []
    for p in range(stages):
        held = peak = 0
        for kind, _ in schedule_ops(p, stages, micro_batches, schedule):
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        out.append(peak)
    return out


def simulate_clients(devices: Sequence[Stage], device_hops: Sequence[Hop], servers: Sequence[Stage],
                     hops: Sequence[Hop], micro_batches: int, schedule: str, steps: int,
                     barrier_every: int = 0, barrier_ms: float = 0.0) -> float:
    """Mean step time (ms) over ``steps`` steps of devices training in parallel (``sfl``, ``psl``):
    device c (``devices[c]``, its own link ``device_hops[c]`` to the first server) pushes its ``M``
    micro-batches into the servers' chain, which runs :func:`schedule_ops` over all ``C * M`` of them
    (device c's are ``c*M .. c*M+M-1``, the order the stage server takes them in).

    Unlike :func:`predict`, steps are not run one after another: a device starts its next step as
    soon as it is done with its own (its update included), so its forward and upload overlap the
    servers' work on the other devices' micro-batches; a server starts the next step after its own
    update.  Every ``barrier_every`` steps (``sfl``'s FedAvg) a device's step ends only when every
    device's backward is done and ``barrier_ms`` more have passed (the adapters up and their average
    back).  With one device this is ``steps`` times :func:`simulate`'s step."""
    c_n, m_n = len(devices), micro_batches
    n = 1 + len(servers)
    _check(schedule, n, m_n, 1 + len(hops))
    if len(device_hops) != c_n or c_n < 1 or steps < 1:
        raise ValueError(f"need a link per device and at least one device and step, got {len(device_hops)} "
                         f"links for {c_n} devices, {steps} steps")
    g_n = c_n * m_n
    dev_ops = schedule_ops(0, n, m_n, schedule)
    srv_ops = [schedule_ops(p, n, g_n, schedule) for p in range(1, n)]
    # every node's work over all steps: (step, kind, micro-batch g); devices first, then the servers
    work = [[(k, kind, c * m_n + m) for k in range(steps) for kind, m in dev_ops] for c in range(c_n)]
    work += [[(k, kind, g) for k in range(steps) for kind, g in ops] for ops in srv_ops]
    stage_of = [devices[c] for c in range(c_n)] + list(servers)
    per_step = [len(dev_ops)] * c_n + [len(ops) for ops in srv_ops]
    free = [0.0] * len(work)
    nxt = [0] * len(work)
    bwd_end: dict[tuple[int, int], float] = {}  # (device, step) -> its last backward's end
    step_end: dict[tuple[int, int], float] = {}  # (device, step) -> when its step ends
    arrive: dict[tuple[str, int, int, int], float] = {}  # (kind, stage, g, step) -> input there
    link: dict[tuple[str, int], float] = {}  # (direction, link: -1-c for device c's, else hop index)

    def send(kind: str, key: int, h: Hop, first: bool, at: float) -> float:
        cold = (h.forward_restart_ms if kind == "F" else h.backward_restart_ms) if first else 0.0
        sent = max(at, link.get((kind, key), 0.0)) + (h.forward_ms if kind == "F" else h.backward_ms) + cold
        link[(kind, key)] = sent
        return sent + h.latency_ms

    def device_start(c: int, k: int) -> float | None:
        if k == 0:
            return 0.0
        if (c, k - 1) in step_end:
            return step_end[(c, k - 1)]
        if barrier_every and k % barrier_every == 0 and all((d, k - 1) in bwd_end for d in range(c_n)):
            end = max(bwd_end[(d, k - 1)] for d in range(c_n)) + barrier_ms
            for d in range(c_n):
                step_end[(d, k - 1)] = max(end, bwd_end[(d, k - 1)])
            return step_end[(c, k - 1)]
        return None

    moved = True
    while moved:
        moved = False
        for i, ops in enumerate(work):
            while nxt[i] < len(ops):
                k, kind, g = ops[nxt[i]]
                dev = i < c_n
                p = 0 if dev else i - c_n + 1
                ready = device_start(i, k) if dev and kind == "F" else arrive.get((kind, p, g, k))
                if ready is None:
                    break
                s = stage_of[i]
                end = max(free[i], ready) + (s.forward_ms if kind == "F" else s.backward_ms)
                last_of_step = (nxt[i] + 1) % per_step[i] == 0
                free[i] = end + (s.update_ms if last_of_step else 0.0)
                if kind == "F" and p == n - 1:
                    arrive[("B", p, g, k)] = end
                elif kind == "F":
                    c, m = divmod(g, m_n)
                    h, key, first = (device_hops[c], -1 - c, m == 0) if dev else (hops[p - 1], p - 1, g == 0)
                    arrive[("F", p + 1, g, k)] = send("F", key, h, first, end)
                elif p > 1:
                    arrive[("B", p - 1, g, k)] = send("B", p - 2, hops[p - 2], g == 0, end)
                elif p == 1:
                    c, m = divmod(g, m_n)
                    arrive[("B", 0, g, k)] = send("B", -1 - c, device_hops[c], m == 0, end)
                if dev and last_of_step:
                    bwd_end[(i, k)] = free[i]
                    if not (barrier_every and (k + 1) % barrier_every == 0):
                        step_end[(i, k)] = free[i]
                nxt[i] += 1
                moved = True
    if any(nxt[i] < len(ops) for i, ops in enumerate(work)):
        raise RuntimeError(f"schedule {schedule} deadlocks across devices: nodes stopped at ops {nxt}")
    device_start(0, steps)  # the last step's barrier: no next step asked for it
    ends = [step_end.get((c, steps - 1), free[c]) for c in range(c_n)] + free[c_n:]
    return max(ends) / steps
