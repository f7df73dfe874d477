"""The serving loop of one training stage: activations in from upstream, gradients back to it.

Single-threaded and event-driven: every message is taken off the sockets as it comes and parked
in a buffer; the stage runs its schedule's passes (``testbed.apps.training.schedule``) in order as
soon as each one's input is there.  After the last pass of a step, the optimizer steps (each stage
owns its adapters and their AdamW state).  Statistics rows, one per step, leave on request
(TRAIN_STATS, answered once the step asked about is done here and downstream) and adapter weights
on TRAIN_PULL; both are relayed along the chain.

Several clients (``clients`` C > 1, the first stage server facing them all): a step carries the C
clients' M micro-batches each, numbered ``g = c * M + m`` downstream of the first server and run in
that order; every micro-batch's loss is scaled by 1/(C M), so the server-side adapters take one step
on the mean over all clients' samples.  With ``aggregate_every`` K > 0 the first server is also the
aggregation node: every K steps each client sends its adapters (TRAIN_WEIGHTS) and gets the FedAvg
of all C back.

U-shaped (``head_on_device``): the last server holds no norm, head or loss; it sends each
micro-batch's output up (TRAIN_OUTPUT, relayed by every server to the device that sent it) and waits
for the gradient of the loss w.r.t. that output (TRAIN_HEAD_GRAD, relayed down) before its backward.
No labels ever come: one would be refused.  The schedule counts the device's head as a stage after
the last server.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque

import numpy as np
import torch
import zmq

from testbed.apps.training import wire as tw
from testbed.apps.training.freeze import SmashedStore
from testbed.apps.training.schedule import stage_ops
from testbed.apps.training.settings import StageSettings
from testbed.apps.training.stage import Pending, TrainStage
from testbed.wire.message import Kind, Message, WireError, error, float_values, parse, pong, wire_size

MAX_MSG_BYTES = 1 << 30
WEIGHT_COLS = 4096


def weights_message(session: int, flat: torch.Tensor, hop: int, step: int = 0) -> Message:
    """Flat adapter weights as a zero-padded [R, WEIGHT_COLS] TRAIN_WEIGHTS message: FLOAT32 for
    float32 weights (the adapters of an fp32 model: exact), else FLOAT64."""
    single = flat.dtype == torch.float32
    cols = max(1, min(WEIGHT_COLS, flat.numel()))
    rows = max(1, -(-flat.numel() // cols))
    arr = np.zeros(rows * cols, dtype="<f4" if single else "<f8")
    arr[:flat.numel()] = flat.numpy()
    return float_values(Kind.TRAIN_WEIGHTS, session, step, arr.reshape(rows, cols), micro=hop, single=single)


class StageServer:
    def __init__(self, stage: TrainStage, s: StageSettings, ctx: zmq.Context | None = None) -> None:
        if (s.next is None) != stage.is_last:
            raise ValueError("the last stage, and only it, has no next hop")
        if s.head_on_device:
            stage.drop_head()
        self.stage, self.s = stage, s
        self.ctx = ctx or zmq.Context.instance()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
        for addr in [s.bind, *s.also_bind]:
            self.front.bind(addr)
        self.back: zmq.Socket | None = None
        if s.next:
            self.back = self.ctx.socket(zmq.DEALER)
            self.back.setsockopt(zmq.LINGER, 0)
            self.back.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
            self.back.connect(s.next)
        params = stage.adapters()
        self.opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0) if params else None
        self.facing_clients = s.stage == 1  # the first server: one upstream per client
        # micro-batches per step over all clients (taking turns: one client per step)
        self.total = s.micro_batches if s.turns else s.clients * s.micro_batches
        self.handoff: tuple[int, torch.Tensor] | None = None  # turns: the last device's adapters
        self.waiting: list[tuple[bytes, Message]] = []  # turns: devices asking for them
        self.ops = stage_ops(s.schedule, s.stage, s.pipeline_stages, self.total)
        self.hidden = int(stage.shard.config.hidden_size)
        self.vocab = int(stage.shard.config.vocab_size)
        self.ups: dict[int, bytes] = {}  # client index (0 past the first server) -> ROUTER identity
        self.step = 0
        self.k = 0  # next pass of self.ops
        # arrivals by (step, g): a device that needs no gradient runs ahead into later steps
        self.fwd: dict[tuple[int, int], torch.Tensor] = {}
        self.labels: dict[tuple[int, int], torch.Tensor] = {}
        self.grads: dict[tuple[int, int], torch.Tensor] = {}
        self.pending: dict[int, Pending] = {}
        self.deferred: list[tuple[bytes, Message]] = []  # TRAIN_STATS asked for a step not done yet
        self.askers: deque[bytes] = deque()  # who gets the next relayed reply from downstream
        self.stores: dict[int, SmashedStore] = {}  # a frozen device's smashed data, per client
        self.sample_ids: dict[tuple[int, int], list[int]] = {}  # uploads to keep, by (step, g)
        self.rounds: dict[int, dict[int, torch.Tensor]] = {}  # aggregation: step -> client -> weights
        self.rows: list[np.ndarray] = []
        self.row = np.zeros(tw.K)
        self.t_step0: float | None = None
        self.running = True
        self.dropped: set[int] = set()  # devices left out (sfl/psl: late by more than drop_after_s)
        self.progress = time.monotonic()  # the last pass run or round answered: lateness counts from it
        self.round_since: dict[int, float] = {}
        self.parent = os.getppid()  # an orphaned stage stops (its run's driver was killed)
        self.name = f"stage{s.stage}"
        if s.resume_step:
            self._restore(s.resume_step)

    # ---- checkpoints ------------------------------------------------------------------------
    def _restore(self, step: int) -> None:
        from testbed.apps.training import checkpoint

        checkpoint.restore(self, step)
        self.step = step

    def _checkpoint(self) -> None:
        from testbed.apps.training import checkpoint
        from testbed.apps.training.lora import flatten

        assert self.s.checkpoint_dir is not None
        checkpoint.save(self.s.checkpoint_dir, self.name, self.step, {
            "adapters": flatten(self.stage.named_adapters),
            "opt": self.opt.state_dict() if self.opt is not None else {},
            "rows": torch.from_numpy(np.stack(self.rows)) if self.rows else torch.zeros(0, tw.K)})

    # ---- sending ---------------------------------------------------------------------------
    def _to(self, ident: bytes, msg: Message) -> float:
        self.front.send_multipart([ident, *msg.frames()], copy=False)
        return time.monotonic()

    def _fail(self, ident: bytes, session: int, step: int, text: str) -> None:
        where = f"stage {self.s.stage} (layers {self.s.start}:{self.s.end})"
        self._to(ident, error(session, step, f"{where}: {text}"))

    def _g(self, msg: Message) -> int:
        """The step-wide micro-batch number of an arrival from upstream."""
        c, m = msg.session, msg.position_start
        if self.facing_clients:
            if not 0 <= c < self.s.clients or not 0 <= m < self.s.micro_batches:
                raise WireError(f"client {c} micro-batch {m} outside "
                                f"{self.s.clients} x {self.s.micro_batches}")
            if c in self.dropped:
                raise WireError(f"client {c} was left out of the run (late by more than "
                                f"{self.s.drop_after_s:g} s)")
            if self.s.turns:
                if c != msg.step % self.s.clients:
                    raise WireError(f"step {msg.step} is client {msg.step % self.s.clients}'s turn, "
                                    f"not {c}'s")
                return m
            return c * self.s.micro_batches + m
        if not 0 <= m < self.total:
            raise WireError(f"micro-batch {m} outside 0..{self.total - 1}")
        return m

    def _upstream(self, g: int, step: int) -> tuple[bytes, int, int]:
        """(identity, session, micro-batch field) of a message of micro-batch ``g`` of ``step`` going
        upstream."""
        s = self.s
        if not self.facing_clients:
            return self.ups[0], 0, g
        c, m = (step % s.clients, g) if s.turns else divmod(g, s.micro_batches)
        return self.ups[c], c, m

    def _row_of(self, step: int) -> np.ndarray:
        """The statistics row of ``step``: the current one, or that of a step this stage is done with."""
        i = len(self.rows) - (self.step - step)
        return self.rows[i] if step < self.step and i >= 0 else self.row

    # ---- receiving --------------------------------------------------------------------------
    def on_front(self) -> None:
        frames = self.front.recv_multipart(copy=False)
        t = time.monotonic()
        ident = frames[0].bytes
        try:
            msg = parse(frames[1:])
        except WireError as e:
            self._fail(ident, 0, 0, f"malformed message: {e}")
            return
        try:
            self._from_up(ident, msg, t)
        except Exception as e:  # noqa: BLE001 - a bad request is answered, the node keeps serving
            self._fail(ident, msg.session, msg.step, f"{type(e).__name__}: {e}")

    def _from_up(self, ident: bytes, msg: Message, t: float) -> None:
        if msg.kind in (Kind.TRAIN_FORWARD, Kind.TRAIN_LABELS, Kind.TRAIN_SAMPLES, Kind.TRAIN_HEAD_GRAD):
            if msg.kind == Kind.TRAIN_LABELS and self.s.head_on_device:
                raise WireError("labels stay on the device in a U-shaped run (head on the device)")
            if msg.kind == Kind.TRAIN_HEAD_GRAD and not self.s.head_on_device:
                raise WireError("a head gradient in a run with the head on the last server")
            g = self._g(msg)
            c = msg.session if self.facing_clients else 0
            if self.ups.get(c, ident) != ident:
                raise WireError(f"a second upstream hop for client {c}")
            # a head gradient passing through may belong to a step this stage is done with (nothing
            # trainable here or above: no gradient to wait for); it counts in that step's row
            relay = msg.kind == Kind.TRAIN_HEAD_GRAD and self.back is not None
            if msg.step < self.step and not relay:
                raise WireError(f"step {msg.step} is over (at step {self.step})")
            self.ups[c] = ident
            if self.t_step0 is None and not relay:
                self.t_step0 = t
            row = self._row_of(msg.step)
            row[tw.F["bytes_from_up"]] += msg.nbytes
            key = (msg.step, g)
            if msg.kind == Kind.TRAIN_SAMPLES:
                self._samples(c, key, msg)
            elif msg.kind == Kind.TRAIN_HEAD_GRAD:  # U-shaped: down to the last server, its output's gradient
                row[tw.F["bytes_head_grad_from_up"]] += msg.nbytes
                row[tw.F["t_recv_fwd"]] += t
                if relay:
                    tw.check_hidden(msg, self.hidden)
                    msg.session, msg.position_start = c, g
                    assert self.back is not None
                    self.back.send_multipart(msg.frames(), copy=False)
                    row[tw.F["t_send_fwd"]] += time.monotonic()
                else:
                    t0 = time.perf_counter()
                    self.grads[key] = tw.decode(msg, self.hidden)
                    self.row[tw.F["codec_ms"]] += (time.perf_counter() - t0) * 1e3
            elif msg.kind == Kind.TRAIN_LABELS:
                if self.back is not None:  # relayed to the stage with the loss
                    msg.session, msg.position_start = c, g
                    self.back.send_multipart(msg.frames(), copy=False)
                else:
                    self.labels[key] = tw.labels(msg, self.vocab)
            else:
                self.row[tw.F["t_recv_fwd"]] += t
                t0 = time.perf_counter()
                self.fwd[key] = tw.decode(msg, self.hidden)
                self.row[tw.F["codec_ms"]] += (time.perf_counter() - t0) * 1e3
                ids = self.sample_ids.pop(key, None)
                if ids is not None:  # a frozen device's first upload of these samples: kept for reuse
                    self.stores[c].put(ids, self.fwd[key], msg.nbytes)
        elif msg.kind == Kind.TRAIN_STATS:  # answered once step ``msg.step`` is done here and below
            if msg.step >= self.step:
                self.deferred.append((ident, msg))
            else:
                self._stats(ident, msg)
        elif msg.kind == Kind.TRAIN_PULL and msg.position_start == 0 and self.s.turns and self.facing_clients:
            self.waiting.append((ident, msg))  # the device adapters of step msg.step, once handed on
            self._hand_on()
        elif msg.kind == Kind.TRAIN_PULL:
            if msg.position_start == self.s.stage:
                from testbed.apps.training.lora import flatten

                flat = flatten(self.stage.named_adapters)
                self._to(ident, weights_message(msg.session, flat, self.s.stage))
            elif self.back is not None and msg.position_start > self.s.stage:
                self.askers.append(ident)
                self.back.send_multipart(msg.frames(), copy=False)
            else:
                raise WireError(f"no hop {msg.position_start} downstream of stage {self.s.stage}")
        elif msg.kind == Kind.TRAIN_WEIGHTS and self.facing_clients and self.s.aggregate_every:
            self._aggregate(ident, msg)
        elif msg.kind == Kind.TRAIN_WEIGHTS and self.facing_clients and self.s.turns:
            self.handoff = (msg.step, msg.tensor().reshape(-1))
            self._hand_on()
        elif msg.kind == Kind.PING:
            self._to(ident, pong([self.step, self.k]))
        else:
            raise WireError(f"unexpected {msg.kind.name} from upstream")

    def _samples(self, c: int, key: tuple[int, int], msg: Message) -> None:
        """A frozen device's micro-batch by sample id: its activations from the store when every sample
        was uploaded before (nothing else comes), else noted to keep the upload that follows."""
        if self.stage.grad_in or not self.facing_clients:
            raise WireError("sample ids come only from a device without adapters, to the first server")
        ids = [int(v) for v in msg.tensor().reshape(-1)]
        store = self.stores.setdefault(c, SmashedStore())
        if store.missing(ids):
            self.sample_ids[key] = ids
            return
        saved = store.bytes_saved
        self.fwd[key] = store.get(ids)
        self.row[tw.F["smashed_bytes_saved"]] += store.bytes_saved - saved
        self.row[tw.F["smashed_reused"]] += len(ids)

    def _hand_on(self) -> None:
        """Answer the devices waiting for the adapters of a step that has been handed on."""
        if self.handoff is None:
            return
        step, flat = self.handoff
        for ident, msg in [w for w in self.waiting if w[1].step == step]:
            self._to(ident, weights_message(msg.session, flat, 0, step))
        self.waiting = [w for w in self.waiting if w[1].step != step]

    def _aggregate(self, ident: bytes, msg: Message) -> None:
        """FedAvg of the clients' adapters: answered to all once every client's weights are in."""

        if not 0 <= msg.session < self.s.clients:
            raise WireError(f"weights of client {msg.session} of {self.s.clients}")
        got = self.rounds.setdefault(msg.step, {})
        self.round_since.setdefault(msg.step, time.monotonic())
        got[msg.session] = msg.tensor().reshape(-1)
        self.ups.setdefault(msg.session, ident)
        self._answer_round(msg.step)

    def _answer_round(self, step: int) -> None:
        """The FedAvg of round ``step``, once every device not left out sent its adapters."""
        from testbed.apps.training.aggregate import fedavg

        got = self.rounds.get(step, {})
        live = [c for c in range(self.s.clients) if c not in self.dropped]
        if not got or any(c not in got for c in live):
            return
        del self.rounds[step]
        self.round_since.pop(step, None)
        self.progress = time.monotonic()
        states = [{"flat": got[c]} for c in live]
        mean = fedavg(states, [1.0] * len(live))["flat"]  # equal batches: equal weights
        for c in live:
            self._to(self.ups[c], weights_message(c, mean, 0, step))  # the clients' dtype: fp32, exact

    # ---- devices that fail mid-round (sfl, psl) ---------------------------------------------------
    def _may_drop(self) -> bool:
        s = self.s
        # past the first server the micro-batch numbers of a left-out device would never come: one hop only
        return bool(s.drop_after_s) and self.facing_clients and s.clients > 1 and not s.turns \
            and self.back is None

    def _late(self, since: float) -> bool:
        return time.monotonic() - max(since, self.progress) > self.s.drop_after_s

    def _drop(self, c: int, why: str) -> None:
        if len(self.dropped) + 1 >= self.s.clients:
            raise RuntimeError(f"client {c} {why}, and no other device is left")
        self.dropped.add(c)
        print(f"train_stage: client {c} left out at step {self.step}: {why}", file=sys.stderr, flush=True)
        for step in list(self.rounds):
            self._answer_round(step)

    def check_rounds(self) -> None:
        """Leave out the devices whose adapters a FedAvg round has waited for too long."""
        if not self._may_drop():
            return
        for step, since in list(self.round_since.items()):
            if self._late(since):
                for c in range(self.s.clients):
                    if c not in self.dropped and c in self.ups and c not in self.rounds.get(step, {}):
                        self._drop(c, f"sent no adapters for the average of step {step} within "
                                      f"{self.s.drop_after_s:g} s")

    def _stats(self, ident: bytes, msg: Message) -> None:
        if self.back is None:
            self._reply_stats(ident, None, msg.session)
        else:
            self.askers.append(ident)
            self.back.send_multipart(msg.frames(), copy=False)

    def _reply_stats(self, ident: bytes, below: np.ndarray | None, session: int) -> None:
        mine = np.stack(self.rows).reshape(1, -1) if self.rows else np.zeros((1, 0))
        table = mine if below is None else np.concatenate([mine, below.reshape(below.shape[0], -1)])
        self._to(ident, float_values(Kind.TRAIN_STATS, session, self.step, table))

    def on_back(self) -> None:
        assert self.back is not None
        frames = self.back.recv_multipart(copy=False)
        t = time.monotonic()
        try:
            msg = parse(frames)
        except WireError as e:
            print(f"train_stage: dropped a malformed message from downstream: {e}", file=sys.stderr)
            return
        if msg.kind == Kind.TRAIN_OUTPUT and self.s.head_on_device and self.ups:
            # U-shaped: the last server's output, on its way up to the device with the head
            try:
                tw.check_hidden(msg, self.hidden)
                if not 0 <= msg.position_start < self.total:
                    raise WireError(f"micro-batch {msg.position_start} outside 0..{self.total - 1}")
                ident, msg.session, msg.position_start = self._upstream(msg.position_start, msg.step)
            except (WireError, KeyError) as e:
                print(f"train_stage: dropped a bad TRAIN_OUTPUT from downstream: {e}", file=sys.stderr)
                return
            n = wire_size(frames)
            row = self._row_of(msg.step)  # a stage with nothing to train may be done with that step
            row[tw.F["bytes_from_down"]] += n
            row[tw.F["bytes_output_from_down"]] += n
            row[tw.F["t_recv_bwd"]] += t
            row[tw.F["t_send_bwd"]] += self._to(ident, msg)
        elif msg.kind == Kind.TRAIN_BACKWARD:
            self.row[tw.F["bytes_from_down"]] += wire_size(frames)
            self.row[tw.F["t_recv_bwd"]] += t
            t0 = time.perf_counter()
            self.grads[(msg.step, msg.position_start)] = tw.decode(msg, self.hidden)
            self.row[tw.F["codec_ms"]] += (time.perf_counter() - t0) * 1e3
        elif msg.kind in (Kind.TRAIN_STATS, Kind.TRAIN_WEIGHTS) and self.askers:
            ident = self.askers.popleft()
            if msg.kind == Kind.TRAIN_STATS:
                self._reply_stats(ident, msg.tensor().numpy(), msg.session)
            else:
                self._to(ident, msg)
        elif msg.kind == Kind.ERROR:
            for ident in dict.fromkeys([*self.askers, *self.ups.values()]):
                self._to(ident, msg)

    # ---- the schedule -----------------------------------------------------------------------
    def advance(self) -> None:
        """Run every pass whose input is there, in schedule order; step the optimizer after the last."""
        st, s, row = self.stage, self.s, self.row
        while self.k < len(self.ops):
            kind, g = self.ops[self.k]
            key = (self.step, g)
            c, m = (self.step % s.clients, g) if s.turns else divmod(g, s.micro_batches)
            if self.facing_clients and c in self.dropped and (kind == "F" or g not in self.pending):
                self.fwd.pop(key, None)
                self.labels.pop(key, None)
                self.k += 1  # a left-out device's micro-batch: the round goes on without it
                continue
            if kind == "F":
                if key not in self.fwd or (st.has_loss and key not in self.labels):
                    # a device not heard from yet may still be loading: only one that ran is left out
                    if self._may_drop() and c in self.ups and self.t_step0 is not None \
                            and self._late(self.t_step0):
                        self._drop(c, f"sent no micro-batch {m} of step {self.step} within "
                                      f"{self.s.drop_after_s:g} s")
                        continue
                    return
                x = self.fwd.pop(key)
                t0 = time.perf_counter()
                scale = 1.0 / self.total  # micro-batches are equal shares of the step's samples
                p = st.forward_micro(x, self.labels.pop(key, None), scale)
                row[tw.F["fwd_ms"]] += (time.perf_counter() - t0) * 1e3
                self.pending[g] = p
                if st.has_loss:
                    row[tw.F["loss"]] += p.loss * scale
                elif self.back is None:  # U-shaped: the output goes up to the device's head
                    t1 = time.perf_counter()
                    ident, c_up, m_up = self._upstream(g, self.step)
                    msg = tw.encode(Kind.TRAIN_OUTPUT, c_up, self.step, m_up, p.out.detach(), s.codec)
                    row[tw.F["codec_ms"]] += (time.perf_counter() - t1) * 1e3
                    row[tw.F["t_send_bwd"]] += self._to(ident, msg)
                else:
                    t1 = time.perf_counter()
                    msg = tw.encode(Kind.TRAIN_FORWARD, c, self.step, g, p.out, s.codec)
                    row[tw.F["codec_ms"]] += (time.perf_counter() - t1) * 1e3
                    assert self.back is not None
                    self.back.send_multipart(msg.frames(), copy=False)
                    row[tw.F["t_send_fwd"]] += time.monotonic()
            else:
                if not st.has_loss and st.grad_out and key not in self.grads:
                    return  # a stage with nothing trainable at or above it gets no gradient
                p = self.pending.pop(g)
                t0 = time.perf_counter()
                grad = st.backward_micro(p, self.grads.pop(key, None))
                row[tw.F["bwd_ms"]] += (time.perf_counter() - t0) * 1e3
                row[tw.F["peak_act_bytes"]] = max(row[tw.F["peak_act_bytes"]], st.meter.peak)
                if grad is not None:
                    t1 = time.perf_counter()
                    if self.facing_clients:
                        msg = tw.encode(Kind.TRAIN_BACKWARD, c, self.step, m, grad, s.grad_codec)
                        ident = self.ups[c]
                    else:
                        msg = tw.encode(Kind.TRAIN_BACKWARD, c, self.step, g, grad, s.grad_codec)
                        ident = self.ups[0]
                    row[tw.F["codec_ms"]] += (time.perf_counter() - t1) * 1e3
                    row[tw.F["t_send_bwd"]] += self._to(ident, msg)
            self.k += 1
            self.progress = time.monotonic()
        self._end_step()

    def _end_step(self) -> None:
        t0 = time.perf_counter()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.row[tw.F["bwd_ms"]] += (time.perf_counter() - t0) * 1e3  # the update counts as backward
        self.row[tw.F["step_ms"]] = (time.monotonic() - (self.t_step0 or time.monotonic())) * 1e3
        self.row[tw.F["clients_dropped"]] = len(self.dropped)
        self.rows.append(self.row)
        self.row = np.zeros(tw.K)
        self.stage.meter.reset_peak()
        self.step += 1
        self.k = 0
        self.t_step0 = None
        if self.s.checkpoint_every and self.step % self.s.checkpoint_every == 0:
            self._checkpoint()
        done = [(i, m) for i, m in self.deferred if m.step < self.step]
        self.deferred = [(i, m) for i, m in self.deferred if m.step >= self.step]
        for ident, msg in done:
            self._stats(ident, msg)

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        if self.back is not None:
            poller.register(self.back, zmq.POLLIN)
        while self.running and os.getppid() == self.parent:
            events = dict(poller.poll(200))
            if self.back is not None and events.get(self.back):
                self.on_back()
            if events.get(self.front):
                self.on_front()
            try:
                self.check_rounds()
                self.advance()
            except Exception as e:  # noqa: BLE001 - reported upstream; the run cannot go on
                for ident in self.ups.values():
                    self._fail(ident, 0, self.step, f"{type(e).__name__}: {e}")
                self.k, self.fwd, self.grads, self.labels, self.pending = 0, {}, {}, {}, {}

    def close(self) -> None:
        self.front.close(0)
        if self.back is not None:
            self.back.close(0)
