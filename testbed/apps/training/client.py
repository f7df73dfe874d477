"""The device side of split training: its own stage, the data, the schedule, the measurements.

Each step: the batch is split into micro-batches; the device runs its passes in its schedule's
order (forwards send labels and activations downstream, backwards wait for the gradient of its
output), then steps its optimizer.  At the end it gathers every stage's statistics rows and
adapter weights over the chain and reports per-step losses, times, bytes and per-hop figures.

U-shaped (``head_on_device``): no labels leave the device; each micro-batch's output comes back
from the last server (TRAIN_OUTPUT), the device's :class:`HeadStage` computes the loss and its
gradient at once, whenever one arrives, and sends that gradient down the chain (TRAIN_HEAD_GRAD).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from testbed.apps.training import wire as tw
from testbed.apps.training.batches import micro_batches
from testbed.apps.training.lora import LoraSpec, adapter_layout, unflatten
from testbed.apps.training.schedule import stage_ops
from testbed.apps.training.settings import ClientSettings
from testbed.apps.training.stage import HeadStage, Pending, TrainStage
from testbed.spec.errors import TestbedError
from testbed.wire.message import Kind, Message, WireError, control, parse, train_labels, wire_size

MAX_MSG_BYTES = 1 << 30


class TrainError(TestbedError, RuntimeError):
    """A stage answered with an error or did not answer in time."""


@dataclass
class TrainClient:
    stage: TrainStage
    s: ClientSettings
    ctx: zmq.Context | None = None
    rows: list[np.ndarray] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # the steps this device trained (sl: its turns)
    uploaded: set[int] = field(default_factory=set)  # frozen device: samples whose activations went up

    def __post_init__(self) -> None:
        self.session = self.s.client  # the header's session field carries the client's index
        self.ctx = self.ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
        assert self.s.next is not None
        self.sock.connect(self.s.next)
        params = self.stage.adapters()
        self.opt = torch.optim.AdamW(params, lr=self.s.lr, weight_decay=0.0) if params else None
        self.ops = stage_ops(self.s.schedule, 0, self.s.pipeline_stages, self.s.micro_batches)
        self.hidden = int(self.stage.shard.config.hidden_size)
        self.head: HeadStage | None = None
        if self.s.head_on_device:
            emb = self.stage.shard.embed_tokens
            self.head = HeadStage(self.s.model, self.stage.meter, emb.weight if emb is not None else None)
            # each micro-batch's share of the step's loss, as on the last server (sfl/psl: of all devices')
            self.loss_scale = 1.0 / (self.s.micro_batches * (1 if self.s.turns else self.s.clients))
            # a run with no adapter at all needs no gradient anywhere
            self.send_head_grad = self.s.trainable is None or bool(self.s.trainable)
        self.name = f"client{self.s.client}"
        self.parent = os.getppid()
        if self.s.resume_step:
            self._restore(self.s.resume_step)

    # ---- checkpoints --------------------------------------------------------------------------
    def _restore(self, step: int) -> None:
        from testbed.apps.training import checkpoint

        state = checkpoint.restore(self, step)
        self.steps = [int(v) for v in state["steps"]]
        self.step_ms = [float(v) for v in state["step_ms"]]
        self.bytes_up = [int(v) for v in state["bytes_up"]]
        self.bytes_down = [int(v) for v in state["bytes_down"]]

    def checkpoint(self, done: int, until: int | None = None) -> None:
        """After ``done`` steps of the run: this device's state, when a checkpoint is due.  ``until``
        (devices taking turns): the state holds until that many steps are done (the device's next
        turn), and goes out as the checkpoint of every step due up to then."""
        k = self.s.checkpoint_every
        last = done if until is None else until  # below done: nothing (its turn comes first)
        due = [d for d in range(done, last + 1) if k and d % k == 0]
        if not due:
            return
        from testbed.apps.training import checkpoint
        from testbed.apps.training.lora import flatten

        assert self.s.checkpoint_dir is not None
        keep = checkpoint.keep_for_turns(self.s.clients, k) if self.s.turns else checkpoint.KEEP
        state = {
            "adapters": flatten(self.stage.named_adapters),
            "opt": self.opt.state_dict() if self.opt is not None else {},
            "rows": torch.from_numpy(np.stack(self.rows)) if self.rows else torch.zeros(0, tw.K),
            "steps": [int(v) for v in self.steps], "step_ms": [float(v) for v in self.step_ms],
            "bytes_up": [int(v) for v in self.bytes_up], "bytes_down": [int(v) for v in self.bytes_down]}
        for d in due:
            checkpoint.save(self.s.checkpoint_dir, self.name, d, state, keep=keep)

    # ---- messages -------------------------------------------------------------------------
    def _send(self, msg: Message) -> int:
        frames = msg.frames()
        self.sock.send_multipart(frames, copy=False)
        return wire_size(frames)

    def _recv(self) -> tuple[Message, int, float]:
        deadline = time.monotonic() + self.s.timeout_s
        while not self.sock.poll(200):  # in slices: an orphaned device stops (its driver was killed)
            if os.getppid() != self.parent:
                raise TrainError("the run's driver is gone")
            if time.monotonic() > deadline:
                raise TrainError(f"no answer from {self.s.next} within {self.s.timeout_s:.0f} s")
        frames = self.sock.recv_multipart(copy=False)
        t = time.monotonic()
        try:
            msg = parse(frames)
        except WireError as e:
            raise TrainError(f"malformed message from the next stage: {e}") from None
        if msg.kind == Kind.ERROR:
            raise TrainError(msg.text())
        return msg, wire_size(frames), t

    def connect(self) -> None:
        self._send(control(Kind.PING))
        msg, _, _ = self._recv()
        if msg.kind != Kind.PONG:
            raise TrainError(f"expected PONG, got {msg.kind.name}")

    # ---- training ---------------------------------------------------------------------------
    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor, ids: tuple[int, ...] | None = None
                   ) -> None:
        """One step; ``ids``: the batch's sample ids, with which a device without adapters sends each
        sample's activations once (the first server keeps them) and only the ids afterwards."""
        s, st = self.s, self.stage
        xs, ys = micro_batches(x, s.micro_batches), micro_batches(y, s.micro_batches)
        reuse = ids is not None and not st.named_adapters
        ids_m = [[int(v) for v in t] for t in micro_batches(torch.tensor(ids), s.micro_batches)] \
            if reuse and ids is not None else []
        row = np.zeros(tw.K)
        up = down = 0
        grads: dict[int, torch.Tensor] = {}
        heads: set[int] = set()  # U-shaped: micro-batches whose loss the device's head computed
        pending: dict[int, Pending | None] = {}
        t_start = time.monotonic()
        for kind, m in self.ops:
            if kind == "F":
                if reuse:
                    up += self._send(train_samples(self.session, step, m, ids_m[m]))
                    if all(i in self.uploaded for i in ids_m[m]):  # the edge has them: no forward at all
                        pending[m] = None
                        if self.head is None:
                            up += self._send(train_labels(self.session, step, m, ys[m]))
                        continue
                    self.uploaded.update(ids_m[m])
                t0 = time.perf_counter()
                p = st.forward_micro(xs[m])
                row[tw.F["fwd_ms"]] += (time.perf_counter() - t0) * 1e3
                pending[m] = p
                if self.head is None:  # U-shaped: the labels stay here
                    up += self._send(train_labels(self.session, step, m, ys[m]))
                t1 = time.perf_counter()
                msg = tw.encode(Kind.TRAIN_FORWARD, self.session, step, m, p.out, s.codec)
                row[tw.F["codec_ms"]] += (time.perf_counter() - t1) * 1e3
                up += self._send(msg)
                row[tw.F["t_send_fwd"]] += time.monotonic()
                continue
            while st.grad_out and m not in grads:  # a frozen device needs no gradient
                sent, got = self._take(step, ys, grads, heads, row)
                up, down = up + sent, down + got
            t0 = time.perf_counter()
            done = pending.pop(m)
            if done is not None:
                st.backward_micro(done, grads.pop(m, None))
            row[tw.F["bwd_ms"]] += (time.perf_counter() - t0) * 1e3
            row[tw.F["peak_act_bytes"]] = max(row[tw.F["peak_act_bytes"]], st.meter.peak)
        while self.head is not None and len(heads) < s.micro_batches:  # e.g. a frozen device: no waits above
            sent, got = self._take(step, ys, grads, heads, row)
            up, down = up + sent, down + got
        row[tw.F["peak_act_bytes"]] = max(row[tw.F["peak_act_bytes"]], st.meter.peak)
        t0 = time.perf_counter()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        row[tw.F["bwd_ms"]] += (time.perf_counter() - t0) * 1e3
        if not st.grad_out:  # no gradient came back: the step ends when the whole chain is done with it
            self._barrier(step)
        k = s.aggregate_every
        if k and (step + 1) % k == 0 and st.named_adapters:
            sent, got = self._fedavg(step)
            up, down = up + sent, down + got
        row[tw.F["bytes_from_down"]] = down
        row[tw.F["step_ms"]] = (time.monotonic() - t_start) * 1e3
        st.meter.reset_peak()
        self.rows.append(row)
        self.steps.append(step)
        self.step_ms.append(row[tw.F["step_ms"]])
        self.bytes_up.append(up)
        self.bytes_down.append(down)

    def _take(self, step: int, ys: list[torch.Tensor], grads: dict[int, torch.Tensor], heads: set[int],
              row: np.ndarray) -> tuple[int, int]:
        """Receive one message of ``step``: a gradient of this device's output (kept in ``grads``) or,
        U-shaped, the last server's output of a micro-batch, whose loss and gradient are computed here
        and the gradient sent down at once.  Bytes (sent, received)."""
        msg, n, t = self._recv()
        row[tw.F["t_recv_bwd"]] += t
        m = msg.position_start
        if msg.step != step or not 0 <= m < self.s.micro_batches:
            raise TrainError(f"expected a message of step {step}, got {msg.kind.name} of step {msg.step} "
                             f"micro-batch {m}")
        if msg.kind == Kind.TRAIN_BACKWARD and self.stage.grad_out and m not in grads:
            t1 = time.perf_counter()
            grads[m] = tw.decode(msg, self.hidden)
            row[tw.F["codec_ms"]] += (time.perf_counter() - t1) * 1e3
            return 0, n
        if msg.kind != Kind.TRAIN_OUTPUT or self.head is None or m in heads:
            raise TrainError(f"unexpected {msg.kind.name} of step {step} micro-batch {m}")
        t1 = time.perf_counter()
        try:
            h = tw.decode(msg, self.hidden)
        except WireError as e:
            raise TrainError(f"malformed output from the last server: {e}") from None
        row[tw.F["codec_ms"]] += (time.perf_counter() - t1) * 1e3
        try:
            loss, grad, fwd_ms, bwd_ms = self.head.loss_and_grad(h, ys[m], self.loss_scale)
        except ValueError as e:  # activations of another shape than this micro-batch's labels
            raise TrainError(f"output of micro-batch {m} from the last server: {e}") from None
        heads.add(m)
        row[tw.F["bytes_output_from_down"]] += n
        row[tw.F["loss"]] += loss * self.loss_scale
        row[tw.F["head_fwd_ms"]] += fwd_ms
        row[tw.F["head_bwd_ms"]] += bwd_ms
        if not self.send_head_grad:
            return 0, n
        t4 = time.perf_counter()
        out = tw.encode(Kind.TRAIN_HEAD_GRAD, self.session, step, m, grad, self.s.grad_codec)
        row[tw.F["codec_ms"]] += (time.perf_counter() - t4) * 1e3
        sent = self._send(out)
        row[tw.F["t_send_fwd"]] += time.monotonic()
        return sent, n

    def take_turn(self, step: int) -> None:
        """Before this device's turn at ``step``: the adapters the previous device handed on."""
        pull = control(Kind.TRAIN_PULL, self.session)
        pull.step = step - 1
        sent = self._send(pull)
        msg, got, _ = self._recv()
        if msg.kind != Kind.TRAIN_WEIGHTS or msg.step != step - 1:
            raise TrainError(f"expected the adapters of step {step - 1}, got {msg.kind.name}")
        self._load(msg.tensor().reshape(-1))
        self.pending_bytes = (sent, got)

    def hand_on(self, step: int) -> None:
        """After this device's turn: its adapters to the first server, for the next device."""
        from testbed.apps.training.lora import flatten
        from testbed.apps.training.server import weights_message

        sent, got = getattr(self, "pending_bytes", (0, 0))
        self.pending_bytes = (0, 0)
        sent += self._send(weights_message(self.session, flatten(self.stage.named_adapters), 0, step))
        self.bytes_up[-1] += sent
        self.bytes_down[-1] += got

    def hand_on_again(self, step: int) -> None:
        """After ``--resume`` from ``step + 1`` steps, by the device whose turn ``step`` was: its
        restored adapters (those it handed on then) to the first server once more, for the next device.
        The bytes were counted when it first handed them on."""
        from testbed.apps.training.lora import flatten
        from testbed.apps.training.server import weights_message

        self._send(weights_message(self.session, flatten(self.stage.named_adapters), 0, step))

    def _load(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            i = 0
            for _, p in self.stage.named_adapters:
                p.copy_(flat[i:i + p.numel()].reshape(p.shape).to(p.dtype))
                i += p.numel()

    def _fedavg(self, step: int) -> tuple[int, int]:
        """Send this device's adapters to the aggregation node, take the average back; bytes each way."""
        from testbed.apps.training.lora import flatten
        from testbed.apps.training.server import weights_message

        sent = self._send(weights_message(self.session, flatten(self.stage.named_adapters), 0, step))
        msg, got, _ = self._recv()
        if msg.kind != Kind.TRAIN_WEIGHTS or msg.step != step:
            raise TrainError(f"expected the averaged adapters of step {step}, got {msg.kind.name}")
        self._load(msg.tensor().reshape(-1))
        return sent, got

    def _barrier(self, step: int) -> Message:
        """Every stage's statistics, once each is done with ``step``."""
        ask = control(Kind.TRAIN_STATS, self.session)
        ask.step = step
        self._send(ask)
        msg, _, _ = self._recv()
        return msg

    def stats(self) -> np.ndarray:
        """Statistics of every stage server: [stages - 1, steps, K].  Taking turns: once the whole run
        is done, so that the servers' adapters pulled next are their final ones for every device (as
        ``--local`` saves them), not those of whatever step another device had reached."""
        msg = self._barrier(self.s.steps - 1 if self.s.turns else self.steps[-1])
        if msg.kind != Kind.TRAIN_STATS:
            raise TrainError(f"expected statistics, got {msg.kind.name}")
        table = msg.tensor().numpy()
        return table.reshape(table.shape[0], -1, tw.K)

    def pull_adapters(self, hops: list[tuple[int, int]], spec: LoraSpec) -> dict[str, torch.Tensor]:
        """Adapter weights of every stage, the device's own included, by global name."""
        out = {n: p.detach().clone() for n, p in self.stage.named_adapters}
        for i, (start, end) in enumerate(hops[1:], start=1):
            pull = control(Kind.TRAIN_PULL, self.session)
            pull.position_start = i
            self._send(pull)
            msg, _, _ = self._recv()
            if msg.kind != Kind.TRAIN_WEIGHTS or msg.position_start != i:
                raise TrainError(f"expected the weights of hop {i}, got {msg.kind.name}")
            trainable = set(self.s.trainable) if self.s.trainable is not None else None
            layout = adapter_layout(self.stage.shard.config, start, end, spec, trainable)
            out.update(unflatten(msg.tensor().reshape(-1), layout))
        return out

    def adapter_message_bytes(self) -> int:
        """Wire size of one message of this device's adapters (FedAvg, handing on); 0 without any."""
        from testbed.apps.training.lora import flatten
        from testbed.apps.training.server import weights_message

        if not self.stage.named_adapters:
            return 0
        return wire_size(weights_message(self.session, flatten(self.stage.named_adapters), 0).frames())

    def close(self) -> None:
        self.sock.close(0)


def train_samples(session: int, step: int, micro: int, ids: list[int]) -> Message:
    """A TRAIN_SAMPLES message: the sample ids of a frozen device's micro-batch."""
    msg = train_labels(session, step, micro, torch.tensor(ids, dtype=torch.int64))
    msg.kind = Kind.TRAIN_SAMPLES
    return msg


def summarize(client: TrainClient, servers: np.ndarray, hops: list[str]) -> dict:
    """Losses, step times, bytes and per-hop figures from the device's rows and the servers' table."""
    s = client.s
    mine = np.stack(client.rows)
    # every step so far, this device's or not; U-shaped: this device's own steps, its share of each
    # (the run's record sums the devices': run.merge_clients)
    losses = [float(v) for v in (mine if s.head_on_device else servers[-1])[:, tw.F["loss"]]]
    rows = np.concatenate([mine[None], servers[:, client.steps]])  # [stages, steps, K]
    f = tw.F
    step_ms = [float(v) for v in client.step_ms]
    per_hop = []
    for i, layers in enumerate(hops):
        r = rows[i]
        busy = r[:, f["fwd_ms"]] + r[:, f["bwd_ms"]] + r[:, f["codec_ms"]]
        hop = {"layers": layers, "fwd_ms": _mean(r[:, f["fwd_ms"]]), "bwd_ms": _mean(r[:, f["bwd_ms"]]),
               "codec_ms": _mean(r[:, f["codec_ms"]]),
               "idle_ms": _mean(np.maximum(0.0, np.asarray(step_ms) - busy)),
               "peak_act_bytes": int(r[:, f["peak_act_bytes"]].max())}
        if s.head_on_device:
            busy = busy + r[:, f["head_fwd_ms"]] + r[:, f["head_bwd_ms"]]
            hop["idle_ms"] = _mean(np.maximum(0.0, np.asarray(step_ms) - busy))
        if s.head_on_device and i == 0:  # the device's head: final norm, output layer, loss
            hop.update(head_fwd_ms=_mean(r[:, f["head_fwd_ms"]]), head_bwd_ms=_mean(r[:, f["head_bwd_ms"]]))
        if i > 0:
            prev = rows[i - 1]
            shared = i == 1 and s.clients > 1  # the first server's receipts are all devices', sends ours
            # one-way times: sends and receipts on the machine's one monotonic clock, summed over
            # micro-batches (a message that waits while its receiver computes counts as in transfer)
            up = r[:, f["t_recv_fwd"]] - prev[:, f["t_send_fwd"]]
            down = prev[:, f["t_recv_bwd"]] - r[:, f["t_send_bwd"]]
            hop.update(transfer_up_ms=None if shared else _mean(up * 1e3),
                       transfer_down_ms=None if shared else _mean(down * 1e3),
                       bytes_up_per_step=_mean(r[:, f["bytes_from_up"]]),
                       bytes_down_per_step=_mean(prev[:, f["bytes_from_down"]]))
            if s.head_on_device:  # the extra crossing, included in the bytes above
                hop.update(output_bytes_per_step=_mean(prev[:, f["bytes_output_from_down"]]),
                           head_grad_bytes_per_step=_mean(r[:, f["bytes_head_grad_from_up"]]))
        per_hop.append(hop)
    tokens = s.batch * s.seq
    total_s = sum(step_ms) / 1e3
    return {
        "adapter_message_bytes": client.adapter_message_bytes(),
        "losses": losses, "steps": list(client.steps), "head_on_device": s.head_on_device,
        "step_ms": [round(v, 3) for v in step_ms],
        "step_ms_mean": round(statistics.fmean(step_ms), 3),
        "step_ms_p50": round(statistics.median(step_ms), 3),
        "tokens_per_s": round(tokens * len(step_ms) / total_s, 3) if total_s > 0 else 0.0,
        "bytes_up": list(client.bytes_up), "bytes_down": list(client.bytes_down),
        "bytes_up_per_step": _mean(client.bytes_up), "bytes_down_per_step": _mean(client.bytes_down),
        "per_hop": per_hop,
        # per step, the devices the first server had left out by then (sfl/psl, --drop-after)
        "clients_dropped": [int(v) for v in servers[0][:, f["clients_dropped"]]],
        # a device without adapters: wire bytes of activations the first server reused instead of receiving
        "smashed_bytes_saved": int(servers[0][:, f["smashed_bytes_saved"]].sum()),
        "smashed_reused_samples": int(servers[0][:, f["smashed_reused"]].sum()),
    }


def _mean(values) -> float:
    v = np.asarray(values, dtype=float)
    return round(float(v.mean()), 3) if v.size else 0.0
