"""The device side of split inference: run the first shard locally, send the rest down the chain.

``SplitClient.generate`` runs greedy decoding, measures TTFT/TPOT and every
step's latency, and folds the hop records of the replies into per-hop totals
(compute, codec, transfer time and bytes in each direction of each link).

Recovery: the client keeps the session's token history.  When a stage stops answering (its
connection drops, a node below reports HOP_DOWN, or no reply comes within the step's deadline,
``testbed.apps.inference.recovery``), it re-routes that stage to its next standby and re-prefills
the session from position 0, which rebuilds every stage's KV cache; a node that evicted the
session (its KV budget) answers EVICTED and the session is re-prefilled the same way.

Handover: once ``listen_for_handovers`` ran (the driver program), a handover signal from the run
(``recovery.handover_signal``) moves the session to the named candidate of the first stage after
the device, the new cell's edge, through the same re-route and re-prefill (each in ``handovers``).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass, field

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from testbed.apps.inference.activations import hidden_message
from testbed.apps.inference.recovery import Moved, StageFailed, StepClock, moved_to
from testbed.spec.errors import TestbedError
from testbed.wire.message import (
    HEADER,
    Hop,
    Kind,
    Message,
    WireError,
    control,
    forward_tokens,
    parse,
    reroute,
    wire_size,
)


class SplitError(TestbedError, RuntimeError):
    """A shard node answered with an error or did not answer in time."""


class SessionEvicted(SplitError):
    """A node dropped this session's KV cache (memory budget or idle timeout): re-prefill it."""


@dataclass
class HopTotals:
    layers: str
    compute_ms: float = 0.0
    codec_ms: float = 0.0
    transfer_ms: float = 0.0  # link into this hop, both directions, minus the hop's own service time
    bytes_up: int = 0  # link into this hop, towards it
    bytes_down: int = 0  # link into this hop, back upstream
    payload_up: int = 0  # activation bytes only (bytes_up without the header frames)

    def add(self, compute_ms: float, codec_ms: float, transfer_ms: float, up: int, down: int) -> None:
        self.compute_ms += compute_ms
        self.codec_ms += codec_ms
        self.transfer_ms += transfer_ms
        self.bytes_up += up
        self.bytes_down += down
        self.payload_up += max(0, up - HEADER.size)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("compute_ms", "codec_ms", "transfer_ms"):
            d[k] = round(d[k], 3)
        return d


@dataclass
class SplitClient:
    """Talks to the second hop at ``next_addr``; ``first`` holds this device's layers.

    ``next_standbys``: the second hop's standby addresses; ``routes``: every stage's node names,
    primary first, then its standbys (the device's first; for the records and the number of
    candidates of each stage).  ``floor_ms``: the smallest step deadline (a loaded machine's
    scheduling noise must not look like a failure)."""

    first: object
    next_addr: str | None
    codec: str = "fp32"
    kv_cache: bool = True
    timeout_s: float = 300.0
    layers: list[str] = field(default_factory=list)  # "S:E" of every hop, the device's first
    ctx: zmq.Context | None = None
    next_standbys: list[str] = field(default_factory=list)
    routes: list[list[str]] = field(default_factory=list)
    floor_ms: float = 50.0

    def __post_init__(self) -> None:
        self.session = secrets.randbits(63) or 1
        self.sock: zmq.Socket | None = None
        self.events: zmq.Socket | None = None
        self.seq = 0  # request ids (the wire's step field): a late reply from a failed route never matches
        if self.next_addr:
            self.ctx = self.ctx or zmq.Context.instance()
            self._open(self.next_addr)
        elif self.first is None or not self.first.is_last:
            raise ValueError("the device's shard is not the last one: a next hop is required")
        if not self.layers:
            self.layers = [f"{self.first.start}:{self.first.end}" if self.first else "0:0"]
        self.totals = [HopTotals(x) for x in self.layers]
        if not self.routes:
            self.routes = [[f"hop{i}"] + [f"hop{i}-standby{j}" for j in range(1, 1 + len(self.next_standbys))
                                          if i == 1] for i in range(len(self.layers))]
        self.active = [0] * len(self.routes)  # which candidate serves each stage now
        self.clock = StepClock(self.floor_ms, self.timeout_s)
        self.recoveries: list[dict] = []
        self.rebuilds = 0  # re-prefills after an EVICTED answer
        self.stalls = 0  # deadlines passed while every stage still answered a probe
        self.handovers: list[dict] = []
        self._wake: int | None = None  # the read end of the signal wakeup pipe (handovers)
        self._moved: Moved | None = None  # a handover heard while probing, not yet acted on

    def listen_for_handovers(self) -> None:
        """Hear the run's handover signals (``recovery.handover_signal``) while waiting for replies.

        Installs process-wide signal handlers and the wakeup fd: for a driver program's main thread."""
        if self._wake is not None or len(self.routes) < 2:
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        for k in range(len(self.routes[1])):
            signal.signal(signal.SIGRTMIN + k, lambda *_: None)  # the wakeup fd carries its number
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._wake, self._wake_w = r, w

    # ---- the socket to the next hop --------------------------------------------------------
    def _open(self, addr: str) -> None:
        assert self.ctx is not None
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.events = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(addr)
        self.addr = addr

    def _close_sock(self) -> None:
        if self.sock is not None:
            self.sock.disable_monitor()
            self.sock.close(0)
        if self.events is not None:
            self.events.close(0)
        self.sock = self.events = None

    def _recv(self) -> list:
        assert self.sock is not None
        if not self.sock.poll(int(self.timeout_s * 1000)):
            raise SplitError(f"no reply from {self.next_addr} within {self.timeout_s:.0f} s")
        return self.sock.recv_multipart(copy=False)

    def _await(self, want: tuple[Kind, ...], rid: int, deadline: float, ask_at: float | None = None
               ) -> tuple[Message, list, float]:
        """The reply to request ``rid``; StageFailed when the next hop's connection drops, a node
        reports HOP_DOWN, or the deadline (``time.perf_counter()``) passes.  ``ask_at``: when to
        send every stage a PING if the reply has not come (the early probe, ``StepClock.ask_s``);
        the stages still silent at the deadline go with its StageFailed."""
        assert self.sock is not None and self.events is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        if self._wake is not None:
            poller.register(self._wake, zmq.POLLIN)
        answered: set[int] | None = None  # the stages whose PONG came since the early probe
        while True:
            now = time.perf_counter()
            if ask_at is not None and answered is None and now >= ask_at:
                answered = set()
                for stage in range(1, len(self.routes)):
                    self.sock.send_multipart(Message(Kind.PING, self.session, stage - 1).frames())
            wake = deadline if ask_at is None or answered is not None else min(deadline, ask_at)
            left = wake - now
            ready = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
            if not ready:
                if time.perf_counter() < deadline:
                    continue  # the early probe's time
                silent = None if answered is None else \
                    [s for s in range(1, len(self.routes)) if s not in answered]
                raise StageFailed(None, "no reply in time", time.perf_counter(), silent)
            if self._wake is not None and ready.get(self._wake):
                try:
                    k = moved_to(os.read(self._wake, 512), len(self.routes[1]))
                except BlockingIOError:
                    k = None
                if k is not None:
                    raise Moved(k, time.perf_counter())
                continue
            if ready.get(self.events):
                if recv_monitor_message(self.events)["event"] == zmq.EVENT_DISCONNECTED:
                    raise StageFailed(1, "connection dropped", time.perf_counter())
                continue
            reply = self.sock.recv_multipart(copy=False)
            t = time.perf_counter()
            try:
                msg = parse(reply)
            except WireError as e:
                raise SplitError(f"malformed reply: {e}") from None
            if answered is not None and msg.kind == Kind.PONG and msg.session == self.session:
                answered.add(msg.step + 1)
            if msg.session != self.session or msg.step != rid:
                continue
            if msg.kind == Kind.HOP_DOWN:
                raise StageFailed(1 + msg.position_start, "a hop reported it down", t)
            if msg.kind == Kind.EVICTED:
                raise SessionEvicted(f"session {self.session:#x} was evicted along the chain")
            if msg.kind in want:
                return msg, reply, t

    def step(self, step: int, ids: torch.Tensor, pos: int, cache: object, deadline_s: float | None = None,
             ask_s: float | None = None) -> int:
        """One forward pass of the whole chain; returns the greedy next token id.

        ``deadline_s``: how long to wait for the reply (default ``timeout_s``); StageFailed past it.
        ``ask_s``: when to probe every stage if no reply has come by then (None: never)."""
        t0 = time.perf_counter()
        self.seq += 1
        rid = self.seq
        if self.first is None:  # no layer on the device: upload the token ids
            t1 = t0
            frames = forward_tokens(self.session, rid, pos, ids, self.kv_cache).frames()
        else:
            with torch.inference_mode():
                out = self.first.forward(ids, cache, pos)
            t1 = time.perf_counter()
            if self.sock is None:
                self.totals[0].add((t1 - t0) * 1e3, 0.0, 0.0, 0, 0)
                return int(out[0, -1].argmax())
            frames = hidden_message(self.session, rid, pos, out, self.codec, self.kv_cache).frames()
        compute_ms = (t1 - t0) * 1e3
        t2 = time.perf_counter()
        self.sock.send_multipart(frames, copy=False)
        try:
            msg, reply, t3 = self._await((Kind.RESULT, Kind.ERROR), rid,
                                         t2 + (self.timeout_s if deadline_s is None else deadline_s),
                                         None if ask_s is None else t2 + ask_s)
        except (StageFailed, Moved) as e:
            e.sent_at = t2
            raise
        if msg.kind == Kind.ERROR:
            raise SplitError(msg.text())
        me = Hop(compute_ms, (t2 - t1) * 1e3, (t3 - t0) * 1e3, (t3 - t2) * 1e3, 0, wire_size(reply))
        hops = [me, *msg.hops]
        if len(hops) != len(self.totals):
            raise SplitError(f"reply carries {len(hops) - 1} hop records, expected {len(self.totals) - 1}")
        self.totals[0].add(me.compute_ms, me.codec_ms, 0.0, 0, 0)
        for i in range(1, len(hops)):
            up, prev = hops[i], hops[i - 1]
            self.totals[i].add(up.compute_ms, up.codec_ms, max(0.0, prev.downstream_ms - up.service_ms),
                               up.bytes_in, prev.bytes_reply_in)
        return int(msg.tensor().reshape(-1)[0])

    # ---- recovery ----------------------------------------------------------------------------
    def _probe(self, stage: int, wait_s: float) -> bool:
        """Whether ``stage`` (1: the next hop) answers a PING relayed to it within ``wait_s``."""
        assert self.sock is not None
        self.sock.send_multipart(Message(Kind.PING, self.session, stage - 1).frames())
        try:
            self._await((Kind.PONG,), stage - 1, time.perf_counter() + wait_s)
        except StageFailed:
            return False
        except Moved as m:  # acted on before the next request (the probe's answer no longer matters)
            self._moved = m
        return True

    def _blame(self, failure: StageFailed) -> int | None:
        """Which stage failed: the one a node named, the first still silent after the early probe
        (None: all answered, slow rather than dead), or the first that does not answer a probe now."""
        if failure.stage is not None:
            return failure.stage
        if failure.silent is not None:
            return failure.silent[0] if failure.silent else None
        for stage in range(1, len(self.routes)):
            if not self._probe(stage, self.clock.probe_s(stage)):
                return stage
        return None

    def _has_standby(self, stage: int) -> bool:
        return 0 < stage < len(self.routes) and self.active[stage] + 1 < len(self.routes[stage])

    def _standby_left(self) -> bool:
        return any(self._has_standby(i) for i in range(len(self.routes)))

    def _reroute(self, stage: int, failure: StageFailed) -> dict:
        """Switch ``stage`` to its next standby (SplitError if it has none); returns the record."""
        names = self.routes[stage] if stage < len(self.routes) else [f"hop{stage}"]
        failed = names[self.active[stage]]
        layers = self.layers[stage] if stage < len(self.layers) else "?"
        if self.active[stage] + 1 >= len(names):
            raise SplitError(f"stage {stage} ({failed}, layers {layers}) stopped answering "
                             f"({failure.why}) and has no standby left")
        self.active[stage] += 1
        if stage == 1:
            self._close_sock()
            self._open(([self.next_addr] + list(self.next_standbys))[self.active[1]])
        else:
            self.sock.send_multipart(reroute(stage - 2, self.active[stage], self.session).frames())
        if stage + 1 < len(self.routes) and self.active[stage + 1]:  # the standby's own next hop
            self.sock.send_multipart(reroute(stage - 1, self.active[stage + 1], self.session).frames())
        return {"stage": stage, "layers": layers, "failed_node": failed, "standby": names[self.active[stage]],
                "why": failure.why}

    def _move(self, m: Moved, step: int) -> dict:
        """Move the first stage after the device to candidate ``m.candidate`` (the new cell's edge):
        a new connection from the device's new address (even to the same node: the old one's replies
        go to an address the device no longer has); the re-prefill that follows rebuilds its cache."""
        names = self.routes[1]
        failed = names[self.active[1]]
        self._close_sock()
        self._open(([self.next_addr] + list(self.next_standbys))[m.candidate])
        self.active[1] = m.candidate
        if len(self.routes) > 2 and self.active[2]:  # the new node's next hop: the stage's standby in use
            self.sock.send_multipart(reroute(0, self.active[2], self.session).frames())
        return {"stage": 1, "from_node": failed, "to_node": names[m.candidate], "step": step,
                "detect_ms": round((m.noticed_at - m.sent_at) * 1e3, 3),
                "noticed_at_s": round(time.monotonic() - (time.perf_counter() - m.noticed_at), 6)}

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int]) -> dict:
        """Greedy decoding; stops after ``max_new_tokens`` or at a stop token (which is kept).

        A failed stage is re-routed to its standby and the session re-prefilled from its token
        history (each in ``recoveries``); an evicted session is re-prefilled (``rebuilds``).
        On an error the partial record is in ``self.partial``."""
        ids = prompt_ids.reshape(1, -1).to(torch.int64)
        cache = self.first.new_cache() if self.kv_cache and self.first is not None else None
        tokens: list[int] = []
        step_ms: list[float] = []
        t_start = time.perf_counter()
        self.partial = {"tokens": tokens, "token_ms": step_ms, "recoveries": self.recoveries,
                        "handovers": self.handovers}
        prefill = True  # the next request sends the whole history from position 0
        patient = False  # the next request waits timeout_s (after a stall)
        waiting: list[tuple[dict, float]] = []  # recoveries whose re-prefill has not answered yet
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            while True:
                if self._moved is not None:  # heard while probing
                    m, self._moved = self._moved, None
                    self.handovers.append(self._move(m, step))
                    waiting.append((self.handovers[-1], time.perf_counter()))
                    prefill = True
                if prefill or not self.kv_cache:
                    x, pos = ids, 0
                    if self.first is not None:
                        self.first.reset_cache(cache)
                else:
                    x, pos = ids[:, -1:], ids.shape[1] - 1
                n = int(x.shape[1])
                try:
                    t_req = time.perf_counter()
                    # a deadline only where a standby can take over: without one, waiting is all there is
                    watch = self._standby_left() and not patient
                    wait = self.clock.deadline_s(n, pos == 0 and self.kv_cache) if watch else self.timeout_s
                    ask = self.clock.ask_s(n, pos == 0 and self.kv_cache) if watch else None
                    patient = False
                    tok = self.step(step, x, pos, cache, wait, ask)
                    self.clock.observe(n, pos == 0 and self.kv_cache, (time.perf_counter() - t_req) * 1e3)
                    break
                except SessionEvicted:
                    self.rebuilds += 1
                    prefill = True
                except Moved as m:
                    self.handovers.append(self._move(m, step))
                    waiting.append((self.handovers[-1], time.perf_counter()))
                    prefill = True
                except StageFailed as e:
                    stage = self._blame(e)
                    if e.stage is None and wait >= self.timeout_s and not self._has_standby(stage or 0):
                        raise SplitError(f"no reply from {self.addr} within {self.timeout_s:.0f} s") from None
                    if stage is None or (e.stage is None and not self._has_standby(stage)):
                        # every stage answers (slow, not dead), or only a deadline speaks against a
                        # stage nothing can replace: ask again from scratch, waiting the full timeout
                        self.stalls += 1
                        prefill = patient = True
                        continue
                    rec = self._reroute(stage, e)
                    if e.stage is None:  # a deadline: found by the early probe, or by probes after it
                        rec["found_by"] = "early probe" if e.silent is not None else "probe"
                    rec["detect_ms"] = round((e.detected_at - e.sent_at) * 1e3, 3)
                    rec["detected_at_s"] = round(time.monotonic() - (time.perf_counter() - e.detected_at), 6)
                    self.recoveries.append(rec)
                    waiting.append((rec, time.perf_counter()))
                    prefill = True
            done = time.perf_counter()
            for rec, t_re in waiting:  # re-routed to here and prefilled again: the rebuild's cost
                rec["rebuild_ms"] = round((done - t_re) * 1e3, 3)
            waiting.clear()
            prefill = False
            step_ms.append((time.perf_counter() - t0) * 1e3)
            tokens.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]], dtype=torch.int64)], dim=1)
            if tok in stop_ids:
                break
        total_ms = (time.perf_counter() - t_start) * 1e3
        ttft = step_ms[0] if step_ms else 0.0
        tpot = sum(step_ms[1:]) / (len(step_ms) - 1) if len(step_ms) > 1 else 0.0
        return {
            "tokens": tokens,
            "prompt_tokens": int(prompt_ids.numel()),
            "ttft_ms": round(ttft, 3),
            "tpot_ms": round(tpot, 3),
            "total_ms": round(total_ms, 3),
            "token_ms": [round(x, 3) for x in step_ms],
            "bytes_up": self.totals[1].bytes_up if len(self.totals) > 1 else 0,
            "bytes_down": self.totals[1].bytes_down if len(self.totals) > 1 else 0,
            "per_hop": [t.to_dict() for t in self.totals],
            "recoveries": self.recoveries,
            "kv_rebuilds": self.rebuilds,
            "stalls": self.stalls,
            "handovers": self.handovers,
        }

    def connect(self) -> None:
        """Wait for the connection to the next hop (PING/PONG), so TTFT excludes its set-up; the
        second round trip is the link's RTT, the base of every step's deadline."""
        if self.sock is None:
            return
        for _ in range(2):
            t0 = time.perf_counter()
            self.seq += 1
            self.sock.send_multipart(Message(Kind.PING, self.session, 0).frames())
            while True:
                try:
                    msg = parse(self._recv())
                except WireError as e:
                    raise SplitError(f"malformed reply: {e}") from None
                if msg.kind == Kind.PONG:
                    break
            self.clock.rtt_ms = (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        """Free this session's KV caches along the chain, then the socket."""
        if self._wake is not None:
            signal.set_wakeup_fd(-1)
            os.close(self._wake)
            os.close(self._wake_w)
            self._wake = None
        if self.sock is None:
            return
        try:
            self.sock.send_multipart(control(Kind.CLOSE, self.session).frames())
            self.sock.poll(1000)
        finally:
            self._close_sock()
