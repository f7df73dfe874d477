"""The serving loop of one shard node: a ROUTER socket upstream, a DEALER to the next hop.

Single-threaded and event-driven: while a request waits for the next hop's reply,
the node keeps computing other sessions' requests.  Every inbound message is
validated by ``testbed.wire.message.parse``; a bad one gets an ERROR reply and the
loop carries on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
import zmq

from testbed.apps.inference.activations import hidden_message, hidden_states
from testbed.wire.message import (
    DType,
    Hop,
    Kind,
    Message,
    WireError,
    control,
    error,
    parse,
    pong,
    result,
    wire_size,
)

MAX_MSG_BYTES = 256 << 20


@dataclass
class Session:
    cache: object
    next_pos: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Pending:
    client: bytes
    t_recv: float
    t_sent: float
    compute_ms: float
    codec_ms: float
    bytes_in: int


class ShardServer:
    """Serves one ``Shard`` to many sessions; relays to ``next_addr`` unless it is the last hop."""

    def __init__(self, shard, bind: str, next_addr: str | None, idle_timeout: float = 60.0,
                 ctx: zmq.Context | None = None) -> None:
        if next_addr is None and not shard.is_last:
            raise ValueError(f"layers {shard.start}:{shard.end} are not the last ones: --next is required")
        if next_addr is not None and shard.is_last:
            raise ValueError("the last shard has no next hop")
        self.shard = shard
        self.idle_timeout = idle_timeout
        self.ctx = ctx or zmq.Context.instance()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
        self.front.bind(bind)
        self.back: zmq.Socket | None = None
        if next_addr:
            self.back = self.ctx.socket(zmq.DEALER)
            self.back.setsockopt(zmq.LINGER, 0)
            self.back.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
            self.back.connect(next_addr)
        self.sessions: dict[int, Session] = {}
        self.pending: dict[tuple[int, int], Pending] = {}
        self.served = 0
        self.errors = 0
        self.running = True

    # ---- replies -------------------------------------------------------------------------
    def _reply(self, client: bytes, msg: Message) -> None:
        self.front.send_multipart([client, *msg.frames()], copy=False)

    def _fail(self, client: bytes, session: int, step: int, text: str) -> None:
        self.errors += 1
        self._reply(client, error(session, step, f"layers {self.shard.start}:{self.shard.end}: {text}"))

    # ---- requests from upstream ------------------------------------------------------------
    def on_front(self) -> None:
        frames = self.front.recv_multipart(copy=False)
        t_recv = time.perf_counter()
        client = frames[0].bytes
        try:
            msg = parse(frames[1:])
        except WireError as e:
            self._fail(client, 0, 0, f"malformed message: {e}")
            return
        try:
            if msg.kind == Kind.FORWARD:
                self._forward(client, msg, t_recv)
            elif msg.kind == Kind.CLOSE:
                self.sessions.pop(msg.session, None)
                if self.back is not None:
                    self.back.send_multipart(control(Kind.CLOSE, msg.session).frames())
                self._reply(client, control(Kind.CLOSED, msg.session))
            elif msg.kind == Kind.PING:
                self._reply(client, pong(self.counters()))
            else:
                self._fail(client, msg.session, msg.step, f"unexpected {msg.kind.name} from upstream")
        except Exception as e:  # noqa: BLE001 - a bad request must not stop the node
            self.sessions.pop(msg.session, None)
            self._fail(client, msg.session, msg.step, f"{type(e).__name__}: {e}")

    def _input(self, msg: Message) -> torch.Tensor:
        shard = self.shard
        if shard.is_first:
            if msg.dtype != DType.INT64 or len(msg.shape) != 2 or msg.shape[0] != 1 or msg.shape[1] < 1:
                raise WireError("the first shard takes token ids of shape [1, T]")
            ids = msg.tensor()
            vocab = int(shard.config.vocab_size)
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise WireError("token id out of range")
            return ids
        if msg.dtype != DType.HIDDEN or len(msg.shape) != 3 or msg.shape[0] != 1 or msg.shape[1] < 1:
            raise WireError("hidden states of shape [1, T, H] expected")
        if msg.shape[2] != shard.hidden_size:
            raise WireError(f"hidden size {msg.shape[2]} != {shard.hidden_size}")
        return hidden_states(msg)

    def _forward(self, client: bytes, msg: Message, t_recv: float) -> None:
        t0 = time.perf_counter()
        x = self._input(msg)
        t_tokens = int(msg.shape[1])
        if msg.kv_cache:
            sess = self.sessions.get(msg.session)
            if msg.position_start == 0:
                sess = self.sessions[msg.session] = Session(self.shard.new_cache())
            elif sess is None:
                raise WireError(f"unknown session {msg.session:#x} (closed or idle-expired)")
            if msg.position_start != sess.next_pos:
                raise WireError(f"position {msg.position_start} != expected {sess.next_pos}")
            cache = sess.cache
        else:
            sess, cache = None, None  # the whole sequence is resent and recomputed
        max_pos = int(getattr(self.shard.config, "max_position_embeddings", 1 << 30))
        if msg.position_start + t_tokens > max_pos:
            raise WireError("sequence longer than the model's context")
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.shard.forward(x, cache, msg.position_start)
        t2 = time.perf_counter()
        if sess is not None:
            sess.next_pos = msg.position_start + t_tokens
            sess.last_used = time.monotonic()
        compute_ms = (t2 - t1) * 1e3
        if self.back is None:
            token = int(out[0, -1].argmax())
            hop = Hop(compute_ms, (t1 - t0) * 1e3, 0.0, 0.0, msg.nbytes, 0)
            hop.service_ms = (time.perf_counter() - t_recv) * 1e3
            self.served += 1
            self._reply(client, result(msg.session, msg.step, token, [hop]))
            return
        fwd = hidden_message(msg.session, msg.step, msg.position_start, out, msg.codec or "fp32",
                             msg.kv_cache).frames()
        t3 = time.perf_counter()
        self.pending[(msg.session, msg.step)] = Pending(
            client, t_recv, t3, compute_ms, (t1 - t0 + t3 - t2) * 1e3, msg.nbytes)
        self.back.send_multipart(fwd, copy=False)

    # ---- replies from downstream -----------------------------------------------------------
    def on_back(self) -> None:
        assert self.back is not None
        frames = self.back.recv_multipart(copy=False)
        t_back = time.perf_counter()
        try:
            msg = parse(frames)
        except WireError as e:
            print(f"shard_node: dropped malformed reply from next hop: {e}", file=sys.stderr)
            return
        if msg.kind not in (Kind.RESULT, Kind.ERROR):
            return  # CLOSED acknowledgements and the like
        p = self.pending.pop((msg.session, msg.step), None)
        if p is None:
            return
        if msg.kind == Kind.ERROR:
            self.errors += 1
            self.sessions.pop(msg.session, None)
            self._reply(p.client, msg)
            return
        hop = Hop(p.compute_ms, p.codec_ms, 0.0, (t_back - p.t_sent) * 1e3, p.bytes_in, wire_size(frames))
        hop.service_ms = (time.perf_counter() - p.t_recv) * 1e3
        msg.hops = [hop, *msg.hops][:16]
        self.served += 1
        self._reply(p.client, msg)

    # ---- housekeeping ----------------------------------------------------------------------
    def counters(self) -> list[int]:
        """sessions, KV-cache bytes held, requests served, errors answered."""
        cache_bytes = sum(int(self.shard.cache_bytes(s.cache)) for s in self.sessions.values())
        return [len(self.sessions), cache_bytes, self.served, self.errors]

    def expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v.last_used > self.idle_timeout]:
            del self.sessions[sid]
        t_now = time.perf_counter()
        for key in [k for k, p in self.pending.items() if t_now - p.t_recv > self.idle_timeout]:
            p = self.pending.pop(key)
            self._fail(p.client, key[0], key[1], "next hop did not answer")

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        if self.back is not None:
            poller.register(self.back, zmq.POLLIN)
        last_sweep = time.monotonic()
        while self.running:
            events = dict(poller.poll(200))
            if self.back is not None and events.get(self.back):
                self.on_back()
            if events.get(self.front):
                self.on_front()
            if time.monotonic() - last_sweep > min(1.0, self.idle_timeout / 4):
                self.expire()
                last_sweep = time.monotonic()

    def close(self) -> None:
        self.front.close(0)
        if self.back is not None:
            self.back.close(0)
