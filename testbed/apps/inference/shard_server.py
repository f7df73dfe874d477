"""The serving loop of one shard node: a ROUTER socket upstream, a DEALER to the next hop.

Single-threaded and event-driven: while a request waits for the next hop's reply,
the node keeps computing other sessions' requests.  Every inbound message is
validated by ``testbed.wire.message.parse``; a bad one gets an ERROR reply and the
loop carries on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from testbed.apps.inference.activations import hidden_message, hidden_states
from testbed.apps.inference.kv_cache import KvBudget, cache_bytes, new_int8_cache
from testbed.wire.message import (
    DType,
    Hop,
    Kind,
    Message,
    WireError,
    control,
    error,
    evicted,
    hop_down,
    parse,
    pong_for,
    result,
    wire_size,
)

MAX_MSG_BYTES = 256 << 20
PING_KV_COUNTS = 1  # a PING with this position_start asks for the KV budget's counts too


@dataclass
class Pending:
    client: bytes
    t_recv: float
    t_sent: float
    compute_ms: float
    codec_ms: float
    bytes_in: int


class ShardServer:
    """Serves one ``Shard`` to many sessions; relays to ``next_addr`` unless it is the last hop.

    ``next_standbys``: other addresses of the next stage (its standbys), used when a REROUTE
    names them.  ``kv_budget_bytes``: the sessions' KV caches together stay within it (least
    recently used evicted first); ``kv_int8``: caches hold int8 keys and values.
    """

    def __init__(self, shard, bind: str, next_addr: str | None, idle_timeout: float = 60.0,
                 ctx: zmq.Context | None = None, next_standbys: list[str] | None = None,
                 kv_budget_bytes: int | None = None, kv_int8: bool = False) -> None:
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
        self.back_events: zmq.Socket | None = None
        self.back_down = False
        self.next_addrs = [next_addr, *(next_standbys or [])] if next_addr else []
        self.next_index = 0
        if next_addr:
            self._connect_back(0)
        self.kv = KvBudget(kv_budget_bytes)
        self.kv_int8 = kv_int8
        self.pending: dict[tuple[int, int], Pending] = {}
        self.pings: dict[tuple[int, int], bytes] = {}  # probes relayed down: (session, step) -> client
        self.served = 0
        self.errors = 0
        self.running = True

    @property
    def sessions(self) -> dict:
        return self.kv.sessions

    def _connect_back(self, index: int) -> None:
        """(Re)connect the next-hop socket to candidate ``index``; a monitor reports its disconnects."""
        self._close_back()
        self.back = self.ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
        self.back_events = self.back.get_monitor_socket(zmq.EVENT_DISCONNECTED
                                                        | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.back.connect(self.next_addrs[index])
        self.next_index = index
        self.back_down = False  # its connection dropped and has not come back: answer HOP_DOWN at once

    def _close_back(self) -> None:
        if self.back is not None:
            self.back.disable_monitor()
            self.back.close(0)
        if self.back_events is not None:
            self.back_events.close(0)
        self.back = self.back_events = None

    def new_cache(self):
        return new_int8_cache() if self.kv_int8 else self.shard.new_cache()

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
                self.kv.drop(msg.session, remember=False)
                if self.back is not None:
                    self.back.send_multipart(control(Kind.CLOSE, msg.session).frames())
                self._reply(client, control(Kind.CLOSED, msg.session))
            elif msg.kind == Kind.PING:
                if msg.step > 0 and self.back is not None:  # a probe for a hop further down
                    self.pings[(msg.session, msg.step)] = client
                    self.back.send_multipart(Message(Kind.PING, msg.session, msg.step - 1).frames())
                else:
                    self._reply(client, pong_for(msg.session, msg.step,
                                                 self.counters(kv=msg.position_start == PING_KV_COUNTS)))
            elif msg.kind == Kind.REROUTE:
                self._reroute(msg)
            else:
                self._fail(client, msg.session, msg.step, f"unexpected {msg.kind.name} from upstream")
        except Exception as e:  # noqa: BLE001 - a bad request must not stop the node
            self.kv.drop(msg.session, remember=False)
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
            if msg.position_start == 0:
                sess = self.kv.start(msg.session, self.new_cache(), time.monotonic())
            else:
                sess = self.kv.get(msg.session)
                if sess is None and self.kv.was_dropped(msg.session):
                    self._reply(client, evicted(msg.session, msg.step))  # the client re-prefills
                    return
                if sess is None:
                    raise WireError(f"unknown session {msg.session:#x} (closed or never started)")
                self.kv.hits += 1
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
            self.kv.enforce(msg.session, cache_bytes)
        compute_ms = (t2 - t1) * 1e3
        if self.back is None:
            token = int(out[0, -1].argmax())
            hop = Hop(compute_ms, (t1 - t0) * 1e3, 0.0, 0.0, msg.nbytes, 0)
            hop.service_ms = (time.perf_counter() - t_recv) * 1e3
            self.served += 1
            self._reply(client, result(msg.session, msg.step, token, [hop]))
            return
        if self.back_down:  # the next hop is gone: say so now rather than queue for it
            self._reply(client, hop_down(msg.session, msg.step, 1))
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
        if msg.kind == Kind.PONG:
            client = self.pings.pop((msg.session, msg.step + 1), None)
            if client is not None:
                self._reply(client, pong_for(msg.session, msg.step + 1, msg.tensor().tolist()))
            return
        if msg.kind not in (Kind.RESULT, Kind.ERROR, Kind.EVICTED, Kind.HOP_DOWN):
            return  # CLOSED acknowledgements and the like
        p = self.pending.pop((msg.session, msg.step), None)
        if p is None:
            return
        if msg.kind == Kind.HOP_DOWN:
            self._reply(p.client, hop_down(msg.session, msg.step, msg.position_start + 1))
            return
        if msg.kind == Kind.EVICTED:  # dropped further down: this stage's cache is rebuilt too
            self._reply(p.client, msg)
            return
        if msg.kind == Kind.ERROR:
            self.errors += 1
            self.kv.drop(msg.session, remember=False)
            self._reply(p.client, msg)
            return
        hop = Hop(p.compute_ms, p.codec_ms, 0.0, (t_back - p.t_sent) * 1e3, p.bytes_in, wire_size(frames))
        hop.service_ms = (time.perf_counter() - p.t_recv) * 1e3
        msg.hops = [hop, *msg.hops][:16]
        self.served += 1
        self._reply(p.client, msg)

    # ---- recovery --------------------------------------------------------------------------
    def on_back_event(self) -> None:
        """The next hop's connection dropped (its program died): every request waiting on it is
        answered HOP_DOWN at once, so the client need not wait for a timeout."""
        assert self.back_events is not None
        event = recv_monitor_message(self.back_events)
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.back_down = False
            return
        if event["event"] != zmq.EVENT_DISCONNECTED:
            return
        self.back_down = True
        for (sid, step), p in list(self.pending.items()):
            self._reply(p.client, hop_down(sid, step, 1))
        self.pending.clear()
        self.pings.clear()

    def _reroute(self, msg: Message) -> None:
        """Use next-hop candidate ``position_start`` here (``step`` 0) or pass the order down."""
        if msg.step > 0:
            if self.back is not None:
                self.back.send_multipart(Message(Kind.REROUTE, msg.session, msg.step - 1,
                                                 msg.position_start).frames())
            return
        if not 0 <= msg.position_start < len(self.next_addrs):
            print(f"shard_node: REROUTE to candidate {msg.position_start} of {len(self.next_addrs)} ignored",
                  file=sys.stderr)
            return
        if msg.position_start != self.next_index:
            for (sid, step), p in list(self.pending.items()):  # sent to the failed hop: lost
                self._reply(p.client, hop_down(sid, step, 1))
            self.pending.clear()
            self._connect_back(msg.position_start)
            print(f"shard_node: next hop is now {self.next_addrs[msg.position_start]}", file=sys.stderr)

    # ---- housekeeping ----------------------------------------------------------------------
    def counters(self, kv: bool = False) -> list[int]:
        """sessions, KV-cache bytes held, requests served, errors answered; with ``kv`` (a PING whose
        position_start is PING_KV_COUNTS) then the KV budget's cache hits, evictions and rebuilds
        (sessions prefilled again after being dropped here)."""
        held = sum(cache_bytes(s.cache) for s in self.sessions.values())
        base = [len(self.sessions), held, self.served, self.errors]
        return base + [self.kv.hits, self.kv.evictions, self.kv.rebuilds] if kv else base

    def expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v.last_used > self.idle_timeout]:
            self.kv.drop(sid, remember=True)
        t_now = time.perf_counter()
        for key in [k for k, p in self.pending.items() if t_now - p.t_recv > self.idle_timeout]:
            p = self.pending.pop(key)
            self._fail(p.client, key[0], key[1], "next hop did not answer")

    def serve(self) -> None:
        last_sweep = time.monotonic()
        while self.running:
            poller = zmq.Poller()  # rebuilt each round: a REROUTE replaces the next-hop socket
            poller.register(self.front, zmq.POLLIN)
            if self.back is not None and self.back_events is not None:
                poller.register(self.back, zmq.POLLIN)
                poller.register(self.back_events, zmq.POLLIN)
            events = dict(poller.poll(200))
            if self.back is not None and events.get(self.back):
                self.on_back()
            if self.back_events is not None and events.get(self.back_events):
                self.on_back_event()
            if events.get(self.front):
                self.on_front()
            if time.monotonic() - last_sweep > min(1.0, self.idle_timeout / 4):
                self.expire()
                last_sweep = time.monotonic()

    def close(self) -> None:
        self.front.close(0)
        self._close_back()
